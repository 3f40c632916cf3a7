"""FLoRA: the stacked product (with each client's own alpha/r_k) is merged into the base, clients
restart from a fresh seeded LoRA, ranks differ, and the stacked download grows with sum r_k."""

import itertools
import math

import torch
from hetrank_helpers import (  # noqa: F401 (no_plots is an autouse fixture)
    assert_finite_summary,
    assert_resume_reproduces_the_uninterrupted_run,
    initial_state,
    make_server,
    no_plots,
    random_state,
    updates_for,
    weights_of,
)

from atoll.algorithms.flora import fresh_lora, rebuild_base
from atoll.config import config_with
from atoll.experiment import build
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides

SIZES = [10, 25, 5, 60]
RANKS = [2, 8, 4, 8]


def test_merged_base_is_the_weighted_sum_of_scaled_products_with_unequal_ranks():
    server = make_server("flora", SIZES, RANKS)
    p = weights_of(SIZES)
    merged = {}
    for round in (1, 2):
        states = [random_state(10 * round + i, rank=r) for i, r in enumerate(RANKS)]
        server.aggregate(round, updates_for(states, SIZES))
        for name in ("q", "v"):
            ideal = sum(w * s.lora[name].scale * s.lora[name].B @ s.lora[name].A for w, s in zip(p, states, strict=True))
            merged[name] = merged.get(name, 0) + ideal
            # W0' - W0 = dW*, cumulative over rounds, alpha/r_k included
            assert torch.allclose(server.global_state.base[name], merged[name], atol=1e-5)
            assert torch.allclose(server.global_state.effective_delta(name), merged[name], atol=1e-5)
    assert {s.lora["q"].scale for s in states} == {16.0 / r for r in RANKS}
    # the head is averaged with the same weights
    assert torch.allclose(
        server.global_state.extra["head.bias"], sum(w * s.extra["head.bias"] for w, s in zip(p, states, strict=True)), atol=1e-6
    )


def test_ignoring_the_scale_would_fail():
    """Guard: the merge differs from the unscaled stack product (the defect we must not repeat)."""
    server = make_server("flora", SIZES, RANKS)
    states = [random_state(i, rank=r) for i, r in enumerate(RANKS)]
    server.aggregate(1, updates_for(states, SIZES))
    unscaled = sum(w * s.lora["q"].B @ s.lora["q"].A for w, s in zip(weights_of(SIZES), states, strict=True))
    assert not torch.allclose(server.global_state.base["q"], unscaled, atol=1e-3)


def test_permutation_invariance_and_identical_inputs():
    states = [random_state(i, rank=r) for i, r in enumerate(RANKS)]
    results = []
    for order in itertools.permutations(range(4)):
        server = make_server("flora", SIZES, RANKS)
        server.aggregate(1, [updates_for(states, SIZES)[i] for i in order])
        results.append(server.global_state.base)
    for other in results[1:]:
        for name in other:
            assert torch.allclose(other[name], results[0][name], atol=1e-5)
    server = make_server("flora", SIZES, [4] * 4)
    same = random_state(7, rank=4)
    server.aggregate(1, updates_for([same.clone() for _ in range(4)], SIZES))
    for name in same.lora:
        assert torch.allclose(server.global_state.base[name], same.lora[name].delta(), atol=1e-5)


def test_download_rebuilds_the_base_exactly_and_grows_with_the_sum_of_ranks():
    d = k = 64  # large enough for the stacks to be smaller than the dense base for a while
    sizes = [1] * 4
    downloads = {}
    for ranks in ([2, 2, 2, 2], [2, 6, 2, 6]):
        server = make_server("flora", sizes, ranks, d=d, k=k)
        assert server.configure(1, 0).base == {}
        server.aggregate(1, updates_for([random_state(i, rank=r, d=d, k=k) for i, r in enumerate(ranks)], sizes))
        download = server.configure(2, 0)
        rebuilt = rebuild_base(download)
        for name, tensor in server.global_state.base.items():
            assert torch.equal(rebuilt[name], tensor)  # bit for bit: the client trains on the server's W0'
        stacked = sum(t.numel() for key, t in download.control.items() if key.startswith("flora/"))
        assert stacked == 2 * sum(ranks) * (d + k)
        downloads[sum(ranks)] = download.nbytes()
    assert downloads[16] > downloads[8]
    # once the stacks would outgrow the dense base, the dense base is sent instead
    server = make_server("flora", sizes, [2, 6, 2, 6], d=d, k=k)
    dense = {}
    for round in range(1, 6):
        states = [random_state(10 * round + i, rank=r, d=d, k=k) for i, r in enumerate([2, 6, 2, 6])]
        server.aggregate(round, updates_for(states, sizes))
        download = server.configure(round + 1, 0)
        dense[round] = bool(download.base)
        rebuilt = rebuild_base(download)
        for name, tensor in server.global_state.base.items():
            assert torch.equal(rebuilt[name], tensor)
    # per module: round * sum(r_k) * (d + k) stacked numbers against d * k dense ones
    assert dense == {r: r * 16 * (d + k) >= d * k for r in range(1, 6)} == {1: False, 2: True, 3: True, 4: True, 5: True}
    assert server.configure(6, 0).nbytes() >= 2 * d * k * 4


def test_fresh_lora_is_seeded_by_round_and_shaped_like_peft():
    template = initial_state(8)
    first = fresh_lora(template, seed=0, round=3)
    again = fresh_lora(template, seed=0, round=3)
    later = fresh_lora(template, seed=0, round=4)
    for name, f in first.items():
        assert f.A.shape == template.lora[name].A.shape and f.scale == template.lora[name].scale
        assert torch.count_nonzero(f.B) == 0
        assert f.A.abs().max() <= 1 / math.sqrt(f.A.shape[1])
        assert torch.equal(f.A, again[name].A)
        assert not torch.equal(f.A, later[name].A)
        assert not torch.equal(f.A, template.lora[name].A)


def test_checkpoint_round_trip_gives_the_same_downloads():
    server = make_server("flora", SIZES, RANKS, d=64, k=64)
    server.aggregate(1, updates_for([random_state(i, rank=r, d=64, k=64) for i, r in enumerate(RANKS)], SIZES))
    restored = make_server("flora", SIZES, RANKS, d=64, k=64)
    restored.load_state_dict(server.state_dict())
    assert restored.configure(2, 1).to_tensors().keys() == server.configure(2, 1).to_tensors().keys()
    for key, tensor in server.configure(2, 1).to_tensors().items():
        assert torch.equal(restored.configure(2, 1).to_tensors()[key], tensor)


def test_clients_train_their_own_rank_on_the_merged_base(tmp_path):
    config = config_with(tiny_overrides(tmp_path, **{"algorithm.name": "flora", "model.lora.rank_cycle": [4, 8]}))
    experiment = build(config)
    try:
        server = experiment.server
        updates = [experiment.clients[c].run(1, server.configure(1, c)) for c in range(4)]
        assert [u.state.rank() for u in updates] == [4, 8, 4, 8]
        assert all(u.state.base == {} for u in updates)
        server.aggregate(1, updates)
        start = experiment.clients[1].compose(2, server.configure(2, 1))
        for name, tensor in server.global_state.base.items():
            assert torch.equal(start.base[name], tensor)
            assert torch.count_nonzero(start.lora[name].B) == 0
    finally:
        experiment.close()


def test_end_to_end_run_with_unequal_ranks_finishes_with_finite_metrics(tmp_path):
    config = config_with(tiny_overrides(tmp_path, **{"algorithm.name": "flora", "model.lora.rank_cycle": [4, 8]}))
    run_dir, summary = start_run(config, Progress())
    assert_finite_summary(summary)
    assert (run_dir.path / "adapter" / "base_delta.safetensors").is_file()


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path):
    """Partial participation: fresh LoRA downloads in round 1, dense merged ones from round 2,
    before the cut and across it."""

    def downloads_turned_dense(records, config):
        assert records[2]["bytes_down"] > 3 * records[1]["bytes_down"], "round 2's downloads carry no dense base delta"

    assert_resume_reproduces_the_uninterrupted_run(
        tmp_path,
        {
            "algorithm.name": "flora",
            "model.lora.rank_cycle": [4, 8],
            "federation.rounds": 4,
            "federation.sample_rate": 0.5,
        },
        before_the_cut=downloads_turned_dense,
    )
