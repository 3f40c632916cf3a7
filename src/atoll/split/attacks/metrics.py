"""Attack metrics: token precision/recall and ROUGE-L for recovered inputs, recovery rate and AUC
for recovered labels. Pure functions of id lists and numbers (no torch)."""

from __future__ import annotations

from collections import Counter
from typing import Sequence


def token_precision_recall(predicted: Sequence[int], truth: Sequence[int]) -> tuple[float, float]:
    """Bag-of-tokens overlap (multiset): the share of predicted tokens that occur in the truth, and
    of true tokens that were predicted (VFLAIR-LLM's inversion metric, special tokens removed by
    the caller)."""
    if not predicted or not truth:
        return 0.0, 0.0
    common = sum((Counter(predicted) & Counter(truth)).values())
    return common / len(predicted), common / len(truth)


def longest_common_subsequence(a: Sequence[int], b: Sequence[int]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(predicted: Sequence[int], truth: Sequence[int]) -> float:
    """ROUGE-L F1 on token ids (Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", 2004)."""
    if not predicted or not truth:
        return 0.0
    lcs = longest_common_subsequence(predicted, truth)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(truth)
    return 2 * precision * recall / (precision + recall)


def position_accuracy(predicted: Sequence[int], truth: Sequence[int]) -> float:
    """Share of positions where the recovered token is the true one."""
    if not truth:
        return 0.0
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth)


def recovery_rate(predicted: Sequence[int], truth: Sequence[int]) -> float:
    """Share of labels recovered exactly."""
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth) if truth else 0.0


def auc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random negative
    (ties count half); 0.5 when one class is missing."""
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    if not pos or not neg:
        return 0.5
    wins = 0.0
    for s in pos:
        for t in neg:
            wins += 1.0 if s > t else 0.5 if s == t else 0.0
    return wins / (len(pos) * len(neg))
