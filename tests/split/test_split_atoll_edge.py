"""An attack against atoll's own pretrained causal LM, where inversion means something: atoll-edge
(4 Llama blocks, BPE 4,096, pretrained on open English text that leaves out the benchmark plays)
fine-tuned across a head-tail cut (data party: embeddings + 1 block) on the Shakespeare-roles
lines. Chance: a token guessed at random matches with probability about 1/4,096."""

from __future__ import annotations

import pytest

from atoll.split.attacks.harness import run_attack
from atoll.split.runner import connect, make_knowledge, truth_of

from .helpers import ATOLL_EDGE, reconfigured


@pytest.fixture(scope="module")
def edge_session(atoll_edge_setup, tmp_path_factory):
    """One training step of atoll-edge on Shakespeare lines, recorded by the model party."""
    overrides = {**ATOLL_EDGE, "attacks": "[{name: bisr}]", "record.limit": 1}
    session = connect(reconfigured(atoll_edge_setup, tmp_path_factory.mktemp("edge") / "runs", overrides), None)
    session.parties[0].train_step()
    return session


def test_bisr_phases_recover_shakespeare_lines_from_atoll_edge(edge_session):
    """BiSR (Chen et al., CCS 2024) knowing the public pretrained head: activation matching
    (forward phase) alone reads back most tokens of the lines (measured 0.94 on 4 lines), gradient
    matching (backward phase) alone about half of them from the returned logit gradients (0.51:
    the response tokens; the cue carries no label), no phase nothing."""
    transcript, knowledge, truth = edge_session.transcript(), make_knowledge(edge_session), truth_of(edge_session)
    off = {"inverter_epochs": 0, "backward_steps": 0, "forward_steps": 0, "rows": 4}

    def recall(**phases) -> float:
        result = run_attack("bisr", {**off, **phases}, 0, transcript, knowledge, truth)
        assert result["examples"] == 4
        return result["token_recall"]

    assert recall() <= 0.02
    assert recall(forward_steps=40) >= 0.8
    assert recall(backward_steps=40) >= 0.3
