"""The attacks without a defense, on cases small enough to run in a second: each recovers inputs or
labels far above chance from what the model party received (tiny-llama, head = embeddings + 1
block). Chance here: a token guessed at random matches with probability about 1/436 (the
synthetic BPE's vocabulary), a label score ranks a positive above a negative half of the time.
The white-box inversion is in test_split_privacy.py, batch-level label inference (recovery 1.0
without defense) in test_split_defenses.py. The metrics are checked by hand first."""

from __future__ import annotations


import pytest

from atoll.split.attacks import metrics
from atoll.split.attacks.base import Guess
from atoll.split.attacks.harness import run_attack, score_labels
from atoll.split.runner import connect, make_knowledge, truth_of
from atoll.split.setup import prepare


def test_attack_metrics_by_hand():
    # multiset overlap: predicted {1, 1, 2}, truth {1, 2, 2, 4} share one 1 and one 2
    assert metrics.token_precision_recall([1, 1, 2], [1, 2, 2, 4]) == (2 / 3, 2 / 4)
    # LCS of 1 2 3 4 and 1 3 4 5 6 is 1 3 4: precision 3/4, recall 3/5, F1 = 2/3
    assert metrics.longest_common_subsequence([1, 2, 3, 4], [1, 3, 4, 5, 6]) == 3
    assert metrics.rouge_l([1, 2, 3, 4], [1, 3, 4, 5, 6]) == pytest.approx(2 / 3)
    assert metrics.rouge_l([4, 3, 2, 1], [1, 2, 3, 4]) == pytest.approx(1 / 4)  # order matters, unlike recall
    assert metrics.position_accuracy([1, 9, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert metrics.recovery_rate([0, 1, 2], [0, 2, 2]) == pytest.approx(2 / 3)
    # positives 0.9, 0.8 against negatives 0.8, 0.3: 1 + 1 + 0.5 (tie) + 1 of 4 pairs
    assert metrics.auc([0.9, 0.8, 0.8, 0.3], [True, True, False, False]) == pytest.approx(0.875)
    assert metrics.auc([0.1, 0.2], [True, True]) == 0.5  # one class only: no ranking to score
    # the harness scores AUC for the named positive class against the rest
    guesses = [Guess(0, 1, row, score=s) for row, s in enumerate([3.0, 1.0, 2.0, 0.5])]
    labels = {0: 2, 1: 0, 2: 2, 3: 1}
    result = score_labels(guesses, lambda party, step, row: ([], labels[row]), positive=2)
    assert result["auc"] == 1.0 and "recovery_rate" not in result
    assert score_labels(guesses, lambda party, step, row: ([], labels[row]), positive=0)["auc"] == pytest.approx(1 / 3)


def _trained(split_config, steps: int, **extra):
    session = connect(prepare(split_config(**extra)), None)
    for _ in range(steps):
        session.parties[0].train_step()
    return session


def _attack(session, name: str, params: dict) -> dict[str, float]:
    return run_attack(name, params, 0, session.transcript(), make_knowledge(session), truth_of(session))


def test_relaxation_inversion_recovers_inputs(split_config):
    """Song and Raghunathan (CCS 2020): a softmax over the vocabulary per position, optimised so the
    pretrained head reproduces the received activations, reads back most tokens (measured 0.86)."""
    session = _trained(split_config, 2, **{"attacks": "[{name: relaxation-inversion}]", "record.limit": 1})
    result = _attack(session, "relaxation-inversion", {"steps": 30, "lr": 0.1, "rows": 4})
    assert result["examples"] == 4
    assert result["token_recall"] >= 0.7 and result["position_accuracy"] >= 0.7


def test_bisr_each_phase_recovers_inputs_and_together_they_do_best(split_config):
    """BiSR (Chen et al., CCS 2024) on instruction tuning, head-tail: the gradient-matching
    (backward) phase alone recovers the response tokens from the gradients the data party returned
    (the prompt carries no label, so about 0.39 of the tokens); the activation-matching (forward)
    phase alone most tokens (0.85); the learned inverter alone, trained on 32 auxiliary examples,
    some (0.09); with no phase nothing. All phases together recover at least what the forward
    phase does."""
    session = _trained(split_config, 2, **{"data.source": "synthetic-sft", "attacks": "[{name: bisr}]", "record.limit": 1})
    off = {"inverter_epochs": 0, "backward_steps": 0, "forward_steps": 0, "rows": 2}
    recall = {
        "none": _attack(session, "bisr", off)["token_recall"],
        "backward": _attack(session, "bisr", {**off, "backward_steps": 40})["token_recall"],
        "forward": _attack(session, "bisr", {**off, "forward_steps": 40})["token_recall"],
        "inverter": _attack(session, "bisr", {**off, "auxiliary": 32, "inverter_epochs": 3})["token_recall"],
        "all": _attack(session, "bisr", {"auxiliary": 32, "inverter_epochs": 3, "backward_steps": 40, "forward_steps": 40, "rows": 2})[
            "token_recall"
        ],
    }
    assert recall["none"] <= 0.02
    assert recall["backward"] >= 0.3
    assert recall["forward"] >= 0.7
    assert recall["inverter"] >= 0.04
    assert recall["all"] >= recall["forward"] - 0.02


def test_norm_scoring_ranks_the_rare_class_first(split_config, tmp_path):
    """Li et al. (ICLR 2022): once the model leans toward the common class, the examples of the
    rare class (here 1 in 9) get the larger returned gradients: AUC near 1 (measured 0.995) for
    'rare' from training steps 3, 6, 9, 12, and the mirror image for 'common'."""
    from .helpers import rare_class_source

    source = rare_class_source(tmp_path)
    extra = {"data.source": str(source), "data.max_examples": 400, "train.batch_size": 16, "train.lr": 0.02}
    session = _trained(split_config, 12, **extra, **{"attacks": "[{name: norm-scoring}]", "record.every": 3, "record.limit": 4})
    assert session.setup.num_labels == 2  # 'common' = 0, 'rare' = 1
    rare = _attack(session, "norm-scoring", {"positive_class": 1, "batches": 4})
    common = _attack(session, "norm-scoring", {"positive_class": 0, "batches": 4})
    assert rare["examples"] == 64
    assert rare["auc"] >= 0.9
    assert common["auc"] == pytest.approx(1 - rare["auc"])
