"""FFA-LoRA: A frozen at the shared init forever, B and head averaged, exact aggregation."""

import itertools

import torch
from safetensors.torch import load_file
from hetrank_helpers import (  # noqa: F401 (no_plots is an autouse fixture)
    assert_finite_summary,
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


def test_A_is_bit_identical_after_any_rounds_even_if_clients_send_an_A():
    server = make_server("ffa-lora", SIZES, [4] * 4)
    initial_A = {n: f.A.clone() for n, f in server.global_state.lora.items()}
    for round in range(1, 4):
        # a buggy or hostile client that sends a changed A must not move the server's A
        states = [random_state(10 * round + i) for i in range(4)]
        server.aggregate(round, updates_for(states, SIZES))
        for name, A in initial_A.items():
            assert torch.equal(server.global_state.lora[name].A, A)


def test_B_and_head_are_example_weighted_means_and_aggregation_is_exact():
    server = make_server("ffa-lora", SIZES, [4] * 4)
    A0 = {n: f.A for n, f in server.global_state.lora.items()}
    states = [random_state(i) for i in range(4)]
    for state in states:  # what FFA-LoRA clients train: their own B on the shared A0
        for name, f in state.lora.items():
            f.A = A0[name].clone()
    server.aggregate(1, updates_for(states, SIZES))
    p = weights_of(SIZES)
    for name in A0:
        expected_B = sum(w * s.lora[name].B for w, s in zip(p, states, strict=True))
        assert torch.allclose(server.global_state.lora[name].B, expected_B, atol=1e-6)
        ideal = sum(w * s.lora[name].delta() for w, s in zip(p, states, strict=True))  # sum_k p_k s B_k A0
        assert torch.allclose(server.global_state.lora[name].delta(), ideal, atol=1e-5)
    expected_head = sum(w * s.extra["head.weight"] for w, s in zip(p, states, strict=True))
    assert torch.allclose(server.global_state.extra["head.weight"], expected_head, atol=1e-6)


def test_permutation_invariance_and_identical_inputs():
    states = [random_state(i) for i in range(4)]
    results = []
    for order in itertools.permutations(range(4)):
        server = make_server("ffa-lora", SIZES, [4] * 4)
        server.aggregate(1, [updates_for(states, SIZES)[i] for i in order])
        results.append(server.global_state)
    for other in results[1:]:
        for name in other.lora:
            assert torch.allclose(other.lora[name].B, results[0].lora[name].B, atol=1e-6)
    server = make_server("ffa-lora", SIZES, [4] * 4)
    same = random_state(7)
    server.aggregate(1, updates_for([same.clone() for _ in range(4)], SIZES))
    for name in same.lora:
        assert torch.allclose(server.global_state.lora[name].B, same.lora[name].B, atol=1e-6)


def test_only_B_and_head_travel():
    server = make_server("ffa-lora", SIZES, [4] * 4)
    download = server.configure(1, 0)
    assert all(f.A is None and f.B.numel() > 0 for f in download.lora.values())
    assert download.rank() == 4 and set(download.extra) == {"head.weight", "head.bias"}
    assert download.nbytes() < server.global_state.nbytes()


def test_clients_train_only_B_and_start_from_the_seeded_A(tmp_path):
    experiment = build(config_with(tiny_overrides(tmp_path, **{"algorithm.name": "ffa-lora"})))
    try:
        server, bench = experiment.server, experiment.workbench
        initial = bench.initial_state()
        for client_id in (0, 1):
            update = experiment.clients[client_id].run(1, server.configure(1, client_id))
            trained = bench.read()
            for name, f in initial.lora.items():
                assert torch.equal(trained.lora[name].A, f.A)
                assert not torch.equal(trained.lora[name].B, f.B)
                assert update.state.lora[name].A is None
                assert torch.equal(update.state.lora[name].B, trained.lora[name].B)
    finally:
        experiment.close()


def test_end_to_end_run_finishes_with_finite_metrics(tmp_path):
    run_dir, summary = start_run(config_with(tiny_overrides(tmp_path, **{"algorithm.name": "ffa-lora"})), Progress())
    assert_finite_summary(summary)
    assert summary["bytes_up_total"] > 0
    exported = load_file(str(run_dir.path / "adapter" / "adapter_model.safetensors"))
    frozen = sum(t.numel() for k, t in exported.items() if "lora_A" in k)
    assert frozen > 0
    assert summary["trainable_parameters"] == sum(t.numel() for t in exported.values()) - frozen, "A is frozen, so not counted"
