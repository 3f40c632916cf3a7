"""HetLoRA: truncation down, zero-padding up (at a common scale), sparsity-weighted aggregation,
local rank self-pruning."""

import itertools

import pytest
import torch
from hetrank_helpers import (  # noqa: F401 (no_plots is an autouse fixture)
    assert_finite_summary,
    assert_resume_reproduces_the_uninterrupted_run,
    make_client,
    make_server,
    no_plots,
    random_state,
    scale_of,
    updates_for,
    weights_of,
)

from atoll.algorithms.hetlora import sparsity_weights, tail_norm, tail_size, to_client, to_global
from atoll.config import config_with
from atoll.experiment import build
from atoll.fl.base import average_states
from atoll.fl.state import AdapterState, LoRAFactors, Update
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides

SIZES = [10, 25, 5, 60]
RANKS = [2, 8, 4, 6]


def test_padded_rows_and_columns_contribute_zero():
    f = random_state(1, rank=3).lora["q"]
    padded = to_global(f, 8, scale_of(8))
    assert torch.count_nonzero(padded.A[3:]) == 0 and torch.count_nonzero(padded.B[:, 3:]) == 0
    assert torch.allclose(padded.delta(), f.delta(), atol=1e-5)  # s_g B_pad A_pad = s_k B_k A_k


def test_truncation_then_padding_preserves_the_top_left_block():
    g = random_state(2, rank=8).lora["v"]
    for rank in (1, 3, 8):
        down = to_client(g, rank, scale_of(rank))
        assert down.rank == rank and down.scale == scale_of(rank)
        # the client's delta is the top-r part of the global delta, scales reconciled
        assert torch.allclose(down.delta(), g.scale * g.B[:, :rank] @ g.A[:rank], atol=1e-5)
        up = to_global(down, 8, g.scale)
        assert torch.equal(up.A[:rank], g.A[:rank])
        assert torch.allclose(up.B[:, :rank], g.B[:, :rank], rtol=1e-6, atol=1e-7)
        assert torch.count_nonzero(up.A[rank:]) == 0 and torch.count_nonzero(up.B[:, rank:]) == 0


def test_equal_ranks_and_equal_norms_reduce_to_fedavg():
    states = [random_state(i, rank=4) for i in range(4)]
    for state in states:  # rescale B so every ||s B A||_F is 1
        for f in state.lora.values():
            f.B = f.B / float(f.delta().norm())
    for weighting, weights in (("norm", [0.25] * 4), ("norm_x_examples", weights_of(SIZES)), ("examples", weights_of(SIZES))):
        server = make_server("hetlora", SIZES, [4] * 4, weighting=weighting)
        server.aggregate(1, updates_for(states, SIZES))
        fedavg = average_states(states, weights)
        for name in fedavg.lora:
            assert torch.allclose(server.global_state.lora[name].A, fedavg.lora[name].A, atol=1e-6)
            assert torch.allclose(server.global_state.lora[name].B, fedavg.lora[name].B, atol=1e-6)
    # the head is always example-weighted
    assert torch.allclose(server.global_state.extra["head.bias"], fedavg.extra["head.bias"], atol=1e-6)


def test_unequal_ranks_aggregate_padded_factors_with_norm_weights():
    server = make_server("hetlora", SIZES, RANKS)
    states = [random_state(i, rank=r) for i, r in enumerate(RANKS)]
    updates = updates_for(states, SIZES)
    server.aggregate(1, updates)
    for name in ("q", "v"):
        norms = [float(s.lora[name].delta().norm()) for s in states]
        weights = [n / sum(norms) for n in norms]
        assert sparsity_weights(updates, name, "norm") == pytest.approx(weights, rel=1e-5)
        s_g = scale_of(8)
        expected_A = sum(w * to_global(s.lora[name], 8, s_g).A for w, s in zip(weights, states, strict=True))
        expected_B = sum(w * to_global(s.lora[name], 8, s_g).B for w, s in zip(weights, states, strict=True))
        assert torch.allclose(server.global_state.lora[name].A, expected_A, atol=1e-6)
        assert torch.allclose(server.global_state.lora[name].B, expected_B, atol=1e-6)
        # rows 6 and 7 come from the rank-8 client alone (everyone else padded zeros there)
        assert torch.allclose(server.global_state.lora[name].A[6:], weights[1] * states[1].lora[name].A[6:], atol=1e-6)
    # each client downloads its own rank at its own scale
    for client_id, rank in enumerate(RANKS):
        download = server.configure(2, client_id)
        assert download.rank() == rank and download.lora["q"].scale == scale_of(rank)


def test_permutation_invariance_and_identical_inputs():
    states = [random_state(i, rank=r) for i, r in enumerate(RANKS)]
    results = []
    for order in itertools.permutations(range(4)):
        server = make_server("hetlora", SIZES, RANKS)
        server.aggregate(1, [updates_for(states, SIZES)[i] for i in order])
        results.append(server.global_state)
    for other in results[1:]:
        for name in other.lora:
            assert torch.allclose(other.lora[name].A, results[0].lora[name].A, atol=1e-6)
            assert torch.allclose(other.lora[name].B, results[0].lora[name].B, atol=1e-6)
    server = make_server("hetlora", SIZES, [8] * 4)
    same = random_state(7, rank=8)
    server.aggregate(1, updates_for([same.clone() for _ in range(4)], SIZES))
    for name in same.lora:
        assert torch.allclose(server.global_state.lora[name].A, same.lora[name].A, atol=1e-6)
        assert torch.allclose(server.global_state.lora[name].B, same.lora[name].B, atol=1e-6)


def _with_tail(state, rank, factor, gamma=0.9):
    out = state.clone()
    tail = slice(rank - tail_size(rank, gamma), rank)
    for f in out.lora.values():
        f.B[:, tail] *= factor
    return out


def test_self_pruning_drops_a_shrinking_tail_and_the_server_keeps_the_pruned_rank():
    assert [tail_size(r, 0.9) for r in (1, 4, 8, 10, 20)] == [1, 1, 1, 1, 2]
    server = make_server("hetlora", SIZES, [8, 8, 8, 8], prune_lambda=0.1, prune_gamma=0.75, min_rank=5)
    client = make_client("hetlora", client_id=1, rank=8, prune_lambda=0.1, prune_gamma=0.75, min_rank=5)
    start = client.compose(1, random_state(3, rank=8))
    assert tail_norm(start, 8, 0.75) > 0
    grown = client.upload(1, start, _with_tail(start, 8, 2.0, 0.75))
    assert grown.rank() == 8  # the tail grew: the task needs it
    shrunk = client.upload(1, start, _with_tail(start, 8, 0.5, 0.75))
    assert shrunk.rank() == 6  # 8 - (8 - floor(0.75 * 8))
    for name, f in shrunk.lora.items():
        assert torch.equal(f.A, start.lora[name].A[:6])
    # the server learns the pruned rank from the upload and sends it from then on
    server.aggregate(1, [Update(0, 10, start), Update(1, 10, shrunk)])
    assert server.configure(2, 1).rank() == 6 and server.configure(2, 0).rank() == 8
    # the client pads what it receives back to its adapter size with zeros, and never prunes below min_rank
    padded = client.compose(2, server.configure(2, 1))
    assert padded.rank() == 8 and torch.count_nonzero(padded.lora["q"].B[:, 6:]) == 0
    again = client.upload(2, padded, _with_tail(padded, 6, 0.5, 0.75))
    assert again.rank() == 5
    restored = make_server("hetlora", SIZES, [8, 8, 8, 8])
    restored.load_state_dict(server.state_dict())
    assert restored.configure(2, 1).rank() == 6


def test_no_pruning_when_lambda_is_zero():
    client = make_client("hetlora", rank=8, prune_lambda=0.0)
    start = client.compose(1, random_state(3, rank=8))
    assert client.upload(1, start, _with_tail(start, 8, 0.0)).rank() == 8


def test_regulariser_is_the_tail_norm_and_only_pushes_the_tail(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"algorithm.name": "hetlora", "algorithm.prune_lambda": 0.5, "model.lora.rank_cycle": [4, 8]})
    experiment = build(config_with(overrides))
    try:
        client, bench = experiment.clients[1], experiment.workbench
        download = AdapterState(
            {n: LoRAFactors(f.A, torch.randn_like(f.B), f.scale) for n, f in experiment.server.configure(1, 1).lora.items()},
            experiment.server.configure(1, 1).extra,
        )
        start = client.compose(1, download)
        bench.load(start)
        loss = client.hooks(1, start).extra_loss()
        assert torch.isclose(loss, torch.tensor(0.5 * tail_norm(start, 8, 0.9)), rtol=1e-4)
        loss.backward()
        for A, B, _ in bench.active.lora.values():
            assert torch.count_nonzero(A.grad[:7]) == 0 and torch.count_nonzero(B.grad[:, :7]) == 0
            assert torch.count_nonzero(A.grad[7:]) > 0 and torch.count_nonzero(B.grad[:, 7:]) > 0
            A.grad = B.grad = None
    finally:
        experiment.close()


def test_end_to_end_run_with_unequal_ranks_finishes_with_finite_metrics(tmp_path):
    config = config_with(tiny_overrides(tmp_path, **{"algorithm.name": "hetlora", "model.lora.rank_cycle": [4, 8], "federation.rounds": 3}))
    _, summary = start_run(config, Progress())
    assert_finite_summary(summary)


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path):
    """A strong regulariser: clients prune in round 3, before the cut after it; a pruned client
    trains again in round 5, after the cut, at its pruned rank."""
    from helpers import adapter_bytes

    full: dict[int, int] = {}

    def below_full_rank(record, config) -> bool:
        if not full:
            full.update({rank: adapter_bytes(config, rank) for rank in (4, 8)})
        return record["bytes_up"] < sum(full[config.rank_of(c)] for c in record["clients"])

    def clients_pruned(records, config):
        assert any(below_full_rank(r, config) for r in records[1:]), "nothing was pruned before the cut"

    overrides = {
        "algorithm.name": "hetlora",
        "algorithm.prune_lambda": 1.0,
        "model.lora.rank_cycle": [4, 8],
        "federation.rounds": 5,
        "federation.sample_rate": 0.5,
    }
    records = assert_resume_reproduces_the_uninterrupted_run(tmp_path, overrides, stop_after=3, before_the_cut=clients_pruned)
    config = config_with(tiny_overrides(tmp_path, **overrides))
    assert below_full_rank(records[5], config), "after the cut, a pruned client uploads its pruned rank"
