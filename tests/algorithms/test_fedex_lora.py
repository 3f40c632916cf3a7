"""FedEx-LoRA: W0' + s B_bar A_bar = W0 + sum p_k s B_k A_k with one set of non-uniform weights."""

import itertools

import torch
from hetrank_helpers import (  # noqa: F401 (no_plots is an autouse fixture)
    assert_finite_summary,
    assert_resume_reproduces_the_uninterrupted_run,
    make_server,
    no_plots,
    random_state,
    updates_for,
    weights_of,
)

from atoll.config import config_with
from atoll.experiment import build
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides

SIZES = [10, 25, 5, 60]


def test_exact_aggregation_with_non_uniform_weights_over_rounds():
    server = make_server("fedex-lora", SIZES, [4] * 4)
    p = weights_of(SIZES)
    for round in (1, 2, 3):
        before = server.global_state.clone()
        states = []
        for i in range(4):  # clients train on top of the current merged base
            state = random_state(10 * round + i)
            state.base = before.base
            states.append(state)
        server.aggregate(round, updates_for(states, SIZES))
        for name in ("q", "v"):
            target = sum(w * s.effective_delta(name) for w, s in zip(p, states, strict=True))  # W0_prev + sum p_k s B_k A_k
            assert torch.allclose(server.global_state.effective_delta(name), target, atol=1e-4)
            A_bar = sum(w * s.lora[name].A for w, s in zip(p, states, strict=True))
            B_bar = sum(w * s.lora[name].B for w, s in zip(p, states, strict=True))
            assert torch.allclose(server.global_state.lora[name].A, A_bar, atol=1e-6)
            assert torch.allclose(server.global_state.lora[name].B, B_bar, atol=1e-6)
    head = sum(w * s.extra["head.weight"] for w, s in zip(p, states, strict=True))
    assert torch.allclose(server.global_state.extra["head.weight"], head, atol=1e-6)


def test_unweighted_mean_or_missing_scale_would_not_be_exact():
    """Guards against the two defects of the reference code: the residual uses p_k and s."""
    server = make_server("fedex-lora", SIZES, [4] * 4)
    states = [random_state(i) for i in range(4)]
    server.aggregate(1, updates_for(states, SIZES))
    unscaled = (
        sum(w * s.lora["q"].B @ s.lora["q"].A for w, s in zip(weights_of(SIZES), states, strict=True))
        - server.global_state.lora["q"].B @ server.global_state.lora["q"].A
    )
    assert not torch.allclose(server.global_state.base["q"], unscaled, atol=1e-3)
    uniform = sum(0.25 * s.lora["q"].delta() for s in states) - server.global_state.lora["q"].delta()
    assert not torch.allclose(server.global_state.base["q"], uniform, atol=1e-3)


def test_permutation_invariance_and_identical_inputs():
    states = [random_state(i) for i in range(4)]
    results = []
    for order in itertools.permutations(range(4)):
        server = make_server("fedex-lora", SIZES, [4] * 4)
        server.aggregate(1, [updates_for(states, SIZES)[i] for i in order])
        results.append(server.global_state)
    for other in results[1:]:
        for name in other.lora:
            assert torch.allclose(other.base[name], results[0].base[name], atol=1e-5)
            assert torch.allclose(other.lora[name].A, results[0].lora[name].A, atol=1e-6)
    server = make_server("fedex-lora", SIZES, [4] * 4)
    same = random_state(7)
    server.aggregate(1, updates_for([same.clone() for _ in range(4)], SIZES))
    for name in same.lora:
        assert torch.allclose(server.global_state.lora[name].A, same.lora[name].A, atol=1e-6)
        assert torch.allclose(server.global_state.base[name], torch.zeros_like(server.global_state.base[name]), atol=1e-5)


def test_the_dense_base_is_downloaded_and_counted_but_never_uploaded(tmp_path):
    experiment = build(config_with(tiny_overrides(tmp_path, **{"algorithm.name": "fedex-lora"})))
    try:
        server = experiment.server
        before = server.configure(1, 0).nbytes()
        updates = [experiment.clients[c].run(1, server.configure(1, c)) for c in range(2)]
        assert all(u.state.base == {} for u in updates)
        server.aggregate(1, updates)
        download = server.configure(2, 0)
        dense = sum(t.numel() * t.element_size() for t in download.base.values())
        assert set(download.base) == set(download.lora) and dense > 0
        assert download.nbytes() >= before + dense
        # the next client trains on W0' (the merged residual is applied to the live base weights)
        start = experiment.clients[2].compose(2, download)
        assert all(torch.equal(start.base[n], t) for n, t in server.global_state.base.items())
    finally:
        experiment.close()


def test_end_to_end_run_finishes_with_finite_metrics(tmp_path):
    run_dir, summary = start_run(config_with(tiny_overrides(tmp_path, **{"algorithm.name": "fedex-lora"})), Progress())
    assert_finite_summary(summary)
    assert (run_dir.path / "adapter" / "base_delta.safetensors").is_file()
    assert summary["bytes_down_total"] > summary["bytes_up_total"]


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path):
    assert_resume_reproduces_the_uninterrupted_run(tmp_path, {"algorithm.name": "fedex-lora", "federation.rounds": 3})
