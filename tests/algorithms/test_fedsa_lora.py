"""FedSA-LoRA: A shared and averaged, B private per client (never uploaded, never on the server)."""

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
from conftest import tiny_overrides

SIZES = [10, 25, 5, 60]


def test_server_averages_A_and_never_holds_or_changes_any_B():
    server = make_server("fedsa-lora", SIZES, [4] * 4)
    states = [random_state(i) for i in range(4)]  # a hostile client could even send its B
    server.aggregate(1, updates_for(states, SIZES))
    p = weights_of(SIZES)
    for name, f in server.global_state.lora.items():
        assert torch.allclose(f.A, sum(w * s.lora[name].A for w, s in zip(p, states, strict=True)), atol=1e-6)
        assert f.B is None
    assert all(f.B is None for f in server.configure(2, 0).lora.values())
    assert not any(key.endswith(".B") and t.numel() for key, t in server.state_dict().items())
    # every client downloads the same A
    first = server.configure(2, 0)
    for client_id in (1, 2, 3):
        other = server.configure(2, client_id)
        for name in first.lora:
            assert torch.equal(other.lora[name].A, first.lora[name].A)


def test_permutation_invariance_and_identical_inputs():
    states = [random_state(i) for i in range(4)]
    results = []
    for order in itertools.permutations(range(4)):
        server = make_server("fedsa-lora", SIZES, [4] * 4)
        server.aggregate(1, [updates_for(states, SIZES)[i] for i in order])
        results.append(server.global_state)
    for other in results[1:]:
        for name in other.lora:
            assert torch.allclose(other.lora[name].A, results[0].lora[name].A, atol=1e-6)
    server = make_server("fedsa-lora", SIZES, [4] * 4)
    same = random_state(7)
    server.aggregate(1, updates_for([same.clone() for _ in range(4)], SIZES))
    for name in same.lora:
        assert torch.allclose(server.global_state.lora[name].A, same.lora[name].A, atol=1e-6)


def test_B_stays_on_the_client_persists_across_rounds_and_never_leaks(tmp_path):
    experiment = build(config_with(tiny_overrides(tmp_path, **{"algorithm.name": "fedsa-lora"})))
    try:
        server, bench, store = experiment.server, experiment.workbench, experiment.store
        initial = bench.initial_state()
        u0 = experiment.clients[0].run(1, server.configure(1, 0))
        trained_B = {n: f.B.clone() for n, f in bench.read().lora.items()}
        assert all(f.B is None for f in u0.state.lora.values())
        for name, B in trained_B.items():
            assert torch.equal(store.get(0)[f"B.{name}"], B)
            assert not torch.equal(B, initial.lora[name].B)
        # client 1 runs next in the same process: it starts from the initial B, not client 0's
        start_1 = experiment.clients[1].compose(1, server.configure(1, 1))
        for name, f in start_1.lora.items():
            assert torch.equal(f.B, initial.lora[name].B)
        u1 = experiment.clients[1].run(1, server.configure(1, 1))
        server.aggregate(1, [u0, u1])
        # round 2: client 0 continues from its own B under the new shared A
        start_0 = experiment.clients[0].compose(2, server.configure(2, 0))
        for name, f in start_0.lora.items():
            assert torch.equal(f.B, trained_B[name])
            assert torch.equal(f.A, server.global_state.lora[name].A)
        # personalised evaluation uses the client's own B
        evaluated = experiment.clients[0].evaluation_state(server.configure(2, 0))
        for name, f in evaluated.lora.items():
            assert torch.equal(f.B, trained_B[name])
    finally:
        experiment.close()


def test_personal_head_when_not_shared(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"algorithm.name": "fedsa-lora", "algorithm.share_head": False})
    experiment = build(config_with(overrides))
    try:
        server, bench = experiment.server, experiment.workbench
        assert server.global_state.extra == {}
        update = experiment.clients[0].run(1, server.configure(1, 0))
        assert update.state.extra == {}
        head = bench.read().extra
        start = experiment.clients[0].compose(2, server.configure(2, 0))
        for name, tensor in head.items():
            assert torch.equal(start.extra[name], tensor)
    finally:
        experiment.close()


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path):
    # the private B_k live in the client store, which checkpoints save and resume restores
    assert_resume_reproduces_the_uninterrupted_run(
        tmp_path,
        {
            "algorithm.name": "fedsa-lora",
            "federation.rounds": 4,
            "federation.sample_rate": 0.5,
        },
    )
