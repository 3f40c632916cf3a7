"""FlexLoRA: dW = sum p_k (alpha/r_k) B_k A_k; each client gets the best rank-r_k approximation."""

import itertools

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

from atoll.config import config_with
from atoll.experiment import build
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides

SIZES = [10, 25, 5, 60]
RANKS = [2, 3, 4, 6]


def dense_update(states, sizes):
    return {
        name: sum(
            w * s.lora[name].scale * s.lora[name].B.double() @ s.lora[name].A.double()
            for w, s in zip(weights_of(sizes), states, strict=True)
        )
        for name in ("q", "v")
    }


def test_each_client_gets_the_best_rank_r_approximation_eckart_young():
    server = make_server("flexlora", SIZES, RANKS)
    states = [random_state(i, rank=r) for i, r in enumerate(RANKS)]
    server.aggregate(1, updates_for(states, SIZES))
    delta = dense_update(states, SIZES)
    for client_id, rank in enumerate(RANKS):
        download = server.configure(2, client_id)
        assert download.rank() == rank
        for name, f in download.lora.items():
            assert f.scale == 16.0 / rank  # the client's own alpha/r_k
            U, S, Vh = torch.linalg.svd(delta[name])
            best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
            approx = f.delta().double()
            assert torch.allclose(approx, best, atol=1e-4)
            error = torch.linalg.norm(delta[name] - approx)
            assert torch.isclose(error, torch.sqrt((S[rank:] ** 2).sum()), rtol=1e-4, atol=1e-5)
            assert torch.allclose(f.A @ f.A.T, torch.eye(rank), atol=1e-5)  # A = V_r^T: orthonormal rows


def test_exact_when_the_aggregate_has_rank_at_most_r_and_spare_ranks_stay_trainable():
    ranks = [2, 3, 8]
    server = make_server("flexlora", [10, 30, 5], ranks)
    states = [random_state(i, rank=r) for i, r in enumerate(ranks[:2])]  # rank(dW) <= 5
    server.aggregate(1, updates_for(states, [10, 30]))
    delta = dense_update(states, [10, 30])
    download = server.configure(2, 2)
    for name, f in download.lora.items():
        assert torch.allclose(f.delta().double(), delta[name], atol=1e-5)
        # only 5 singular directions exist: the other 3 ranks get zero B and the seeded initial A rows
        assert torch.count_nonzero(f.B[:, 5:]) == 0
        assert torch.equal(f.A[5:], initial_state(8).lora[name].A[5:])
    # the global model is dW exactly (adapter of rank max r_k + dense remainder in base)
    assert server.global_state.rank() == 8
    for name in delta:
        assert torch.allclose(server.global_state.effective_delta(name).double(), delta[name], atol=1e-5)


def test_global_state_is_dW_and_head_is_averaged():
    server = make_server("flexlora", SIZES, RANKS)
    states = [random_state(i, rank=r) for i, r in enumerate(RANKS)]
    server.aggregate(1, updates_for(states, SIZES))
    delta = dense_update(states, SIZES)
    assert server.global_state.rank() == max(RANKS)
    for name in delta:
        assert torch.allclose(server.global_state.effective_delta(name).double(), delta[name], atol=1e-5)
    head = sum(w * s.extra["head.weight"] for w, s in zip(weights_of(SIZES), states, strict=True))
    assert torch.allclose(server.global_state.extra["head.weight"], head, atol=1e-6)


def test_permutation_invariance_and_identical_inputs():
    states = [random_state(i, rank=r) for i, r in enumerate(RANKS)]
    results = []
    for order in itertools.permutations(range(4)):
        server = make_server("flexlora", SIZES, RANKS)
        server.aggregate(1, [updates_for(states, SIZES)[i] for i in order])
        results.append({c: server.configure(2, c) for c in range(4)})
    for other in results[1:]:
        for client_id, download in other.items():
            for name, f in download.lora.items():
                assert torch.allclose(f.delta(), results[0][client_id].lora[name].delta(), atol=1e-5)
    server = make_server("flexlora", SIZES, [4] * 4)
    same = random_state(7, rank=4)
    server.aggregate(1, updates_for([same.clone() for _ in range(4)], SIZES))
    for name, f in server.configure(2, 0).lora.items():
        assert torch.allclose(f.delta(), same.lora[name].delta(), atol=1e-5)


def test_first_round_uses_the_initial_adapters_and_checkpoints_round_trip():
    server = make_server("flexlora", SIZES, RANKS)
    for client_id, rank in enumerate(RANKS):
        assert torch.equal(server.configure(1, client_id).lora["q"].A, initial_state(rank).lora["q"].A)
    server.aggregate(1, updates_for([random_state(i, rank=r) for i, r in enumerate(RANKS)], SIZES))
    restored = make_server("flexlora", SIZES, RANKS)
    restored.load_state_dict(server.state_dict())
    for client_id in range(4):
        for key, tensor in server.configure(2, client_id).to_tensors().items():
            assert torch.equal(restored.configure(2, client_id).to_tensors()[key], tensor)


def test_clients_train_at_their_own_rank(tmp_path):
    experiment = build(config_with(tiny_overrides(tmp_path, **{"algorithm.name": "flexlora", "model.lora.rank_cycle": [4, 8]})))
    try:
        server = experiment.server
        updates = [experiment.clients[c].run(1, server.configure(1, c)) for c in range(4)]
        assert [u.state.rank() for u in updates] == [4, 8, 4, 8]
        server.aggregate(1, updates)
        assert [server.configure(2, c).rank() for c in range(4)] == [4, 8, 4, 8]
    finally:
        experiment.close()


def test_end_to_end_run_with_unequal_ranks_finishes_with_finite_metrics(tmp_path):
    config = config_with(tiny_overrides(tmp_path, **{"algorithm.name": "flexlora", "model.lora.rank_cycle": [4, 8]}))
    _, summary = start_run(config, Progress())
    assert_finite_summary(summary)


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path):
    assert_resume_reproduces_the_uninterrupted_run(
        tmp_path,
        {
            "algorithm.name": "flexlora",
            "model.lora.rank_cycle": [4, 8],
            "federation.rounds": 4,
            "federation.sample_rate": 0.5,
        },
    )
