"""ROUGE-1, ROUGE-2, ROUGE-L (F1) and exact match between a reconstructed and a true text.

Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", ACL Workshop 2004: n-gram overlap
(clipped counts) and the longest common subsequence, each as an F1 of precision and recall. Texts
are compared as lowercased whitespace tokens (or as given token lists).
"""

from __future__ import annotations

from collections import Counter


def _tokens(text: str | list) -> list:
    return text.lower().split() if isinstance(text, str) else list(text)


def _f1(overlap: int, predicted: int, reference: int) -> float:
    if overlap == 0 or predicted == 0 or reference == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def rouge_n(predicted: str | list, reference: str | list, n: int) -> float:
    guess, truth = _tokens(predicted), _tokens(reference)
    guess_grams = Counter(tuple(guess[i : i + n]) for i in range(len(guess) - n + 1))
    truth_grams = Counter(tuple(truth[i : i + n]) for i in range(len(truth) - n + 1))
    overlap = sum((guess_grams & truth_grams).values())
    return _f1(overlap, sum(guess_grams.values()), sum(truth_grams.values()))


def rouge_l(predicted: str | list, reference: str | list) -> float:
    guess, truth = _tokens(predicted), _tokens(reference)
    previous = [0] * (len(truth) + 1)
    for a in guess:
        current = [0]
        for j, b in enumerate(truth):
            current.append(previous[j] + 1 if a == b else max(previous[j + 1], current[j]))
        previous = current
    return _f1(previous[-1], len(guess), len(truth))


def reconstruction_scores(predicted: list[str], reference: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 and the exact-match rate over aligned pairs of texts."""
    pairs = list(zip(predicted, reference))
    if not pairs:
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "exact_match": 0.0}
    return {
        "rouge1": sum(rouge_n(p, r, 1) for p, r in pairs) / len(pairs),
        "rouge2": sum(rouge_n(p, r, 2) for p, r in pairs) / len(pairs),
        "rougeL": sum(rouge_l(p, r) for p, r in pairs) / len(pairs),
        "exact_match": sum(_tokens(p) == _tokens(r) for p, r in pairs) / len(pairs),
    }
