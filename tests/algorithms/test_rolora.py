"""RoLoRA: rounds alternate the trained factor; the frozen one is shared bit for bit; exact."""

import itertools

import pytest
import torch
from hetrank_helpers import (  # noqa: F401 (no_plots is an autouse fixture)
    assert_finite_summary,
    make_server,
    no_plots,
    random_state,
    updates_for,
    weights_of,
)

from atoll.algorithms.catalog import RoLoRAParams
from atoll.algorithms.rolora import trained_factor
from atoll.config import config_with
from atoll.experiment import build
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides

SIZES = [10, 25, 5, 60]


def test_rounds_alternate_starting_with_the_configured_factor():
    assert [trained_factor(r, RoLoRAParams()) for r in range(1, 6)] == ["B", "A", "B", "A", "B"]
    assert [trained_factor(r, RoLoRAParams(first_factor="A")) for r in range(1, 4)] == ["A", "B", "A"]


@pytest.mark.parametrize("round,trained,frozen", [(1, "B", "A"), (2, "A", "B")])
def test_trained_factor_is_averaged_and_frozen_one_kept_bit_for_bit(round, trained, frozen):
    server = make_server("rolora", SIZES, [4] * 4)
    server.global_state = random_state(50)
    before = server.global_state.clone()
    # clients share the frozen factor; one hostile client sends a changed frozen factor anyway
    states = []
    for i in range(4):
        state = random_state(i)
        for name, f in state.lora.items():
            setattr(f, frozen, getattr(before.lora[name], frozen).clone())
        states.append(state)
    setattr(states[2].lora["q"], frozen, torch.randn_like(getattr(states[2].lora["q"], frozen)))
    server.aggregate(round, updates_for(states, SIZES))
    p = weights_of(SIZES)
    for name in before.lora:
        assert torch.equal(getattr(server.global_state.lora[name], frozen), getattr(before.lora[name], frozen))
        expected = sum(w * getattr(s.lora[name], trained) for w, s in zip(p, states, strict=True))
        assert torch.allclose(getattr(server.global_state.lora[name], trained), expected, atol=1e-6)
    # exact: s * mean(trained) x frozen = mean(s * B_k A_k) over the honest clients' products
    name = "v"
    ideal = sum(w * s.lora[name].delta() for w, s in zip(p, states, strict=True))
    assert torch.allclose(server.global_state.lora[name].delta(), ideal, atol=1e-5)


def test_permutation_invariance_and_identical_inputs():
    states = [random_state(i) for i in range(4)]
    results = []
    for order in itertools.permutations(range(4)):
        server = make_server("rolora", SIZES, [4] * 4)
        server.aggregate(1, [updates_for(states, SIZES)[i] for i in order])
        results.append(server.global_state)
    for other in results[1:]:
        for name in other.lora:
            assert torch.allclose(other.lora[name].B, results[0].lora[name].B, atol=1e-6)
    server = make_server("rolora", SIZES, [4] * 4)
    same = random_state(7)
    server.global_state = same.clone()
    server.aggregate(2, updates_for([same.clone() for _ in range(4)], SIZES))
    for name in same.lora:
        assert torch.allclose(server.global_state.lora[name].A, same.lora[name].A, atol=1e-6)
        assert torch.equal(server.global_state.lora[name].B, same.lora[name].B)


def test_clients_train_one_factor_from_the_global_value_without_leaks(tmp_path):
    experiment = build(config_with(tiny_overrides(tmp_path, **{"algorithm.name": "rolora"})))
    try:
        server, bench = experiment.server, experiment.workbench
        for round, frozen, trained in ((1, "A", "B"), (2, "B", "A")):
            download = server.configure(round, 0)
            updates = []
            for client_id in (0, 1, 2):
                # client 0 trained on the live model before: each client still starts from the global
                update = experiment.clients[client_id].run(round, server.configure(round, client_id))
                live = bench.read()
                for name, f in download.lora.items():
                    assert torch.equal(getattr(live.lora[name], frozen), getattr(f, frozen))
                    assert getattr(update.state.lora[name], frozen) is None
                    assert not torch.equal(getattr(live.lora[name], trained), getattr(f, trained))
                updates.append(update)
            server.aggregate(round, updates)
            for name, f in download.lora.items():
                assert torch.equal(getattr(server.global_state.lora[name], frozen), getattr(f, frozen))
    finally:
        experiment.close()


def test_end_to_end_run_finishes_with_finite_metrics(tmp_path):
    _, summary = start_run(config_with(tiny_overrides(tmp_path, **{"algorithm.name": "rolora", "federation.rounds": 3})), Progress())
    assert_finite_summary(summary)
