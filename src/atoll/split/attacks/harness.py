"""Runs the configured attacks on a transcript and scores their guesses against the truth, which
only this harness sees (the attacks get the transcript and their stated knowledge)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from atoll.split.attacks.base import Attack, Guess, Knowledge
from atoll.split.attacks.metrics import auc, position_accuracy, recovery_rate, rouge_l, token_precision_recall
from atoll.split.plugins import parse_plugin_params, plugin_class

# (party, step, row) -> (true token ids of the real positions, true label or None)
Truth = Callable[[int, int, int], tuple[list[int], int | None]]


def score_inputs(guesses: list[Guess], truth: Truth, special_ids: tuple[int, ...]) -> dict[str, float]:
    """Mean token precision, recall, ROUGE-L and position accuracy, special tokens left out."""
    special = set(special_ids)
    rows = {"token_precision": [], "token_recall": [], "rouge_l": [], "position_accuracy": []}
    for guess in guesses:
        true_tokens, _ = truth(guess.party, guess.step, guess.row)
        predicted = guess.tokens or []
        pairs = [(p, t) for p, t in zip(predicted, true_tokens) if t not in special]
        kept_predicted = [p for p, _ in pairs]
        kept_truth = [t for _, t in pairs]
        precision, recall = token_precision_recall(kept_predicted, kept_truth)
        rows["token_precision"].append(precision)
        rows["token_recall"].append(recall)
        rows["rouge_l"].append(rouge_l(kept_predicted, kept_truth))
        rows["position_accuracy"].append(position_accuracy(kept_predicted, kept_truth))
    return {k: float(np.mean(v)) if v else 0.0 for k, v in rows.items()} | {"examples": float(len(guesses))}


def score_labels(guesses: list[Guess], truth: Truth, positive: int | None = None) -> dict[str, float]:
    """Label recovery rate, and AUC when the guesses carry scores: positives are the examples of
    class ``positive`` (None: any nonzero label, i.e. class 1 of a binary task)."""
    labels = [truth(g.party, g.step, g.row)[1] for g in guesses]
    result = {"examples": float(len(guesses))}
    with_label = [(g.label, t) for g, t in zip(guesses, labels) if g.label is not None and t is not None]
    if with_label:
        result["recovery_rate"] = recovery_rate([p for p, _ in with_label], [t for _, t in with_label])
    with_score = [(g.score, t) for g, t in zip(guesses, labels) if g.score is not None and t is not None]
    if with_score:
        result["auc"] = auc([s for s, _ in with_score], [(t == positive) if positive is not None else bool(t) for _, t in with_score])
    return result


def run_attack(name: str, params: dict, seed: int, transcript, knowledge: Knowledge, truth: Truth) -> dict[str, float]:
    cls: type[Attack] = plugin_class("attack", name)
    attack = cls(parse_plugin_params("attack", name, params, name), seed)
    guesses = attack.run(transcript, knowledge)
    if cls.target == "inputs":
        return score_inputs(guesses, truth, knowledge.special_ids)
    return score_labels(guesses, truth, attack.positive_label())
