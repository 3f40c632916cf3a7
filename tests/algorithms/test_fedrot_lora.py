"""FedRot-LoRA: R in SO(r) (R^T R = I, det R = +1), B R R^T A = B A, lambda = 0 gives R = I (and
FedIT bit for bit), Procrustes optimality, A aligned in odd rounds and B in even rounds, and
clients holding rotated copies of one update are averaged back to it exactly."""

import itertools
import math

import pytest
import torch

from atoll.algorithms.fedrot_lora import project_so, rotate, rotation
from atoll.config import config_with
from atoll.resolve import check
from atoll.errors import ConfigError
from atoll.fl.state import AdapterState
from optsvd_helpers import (  # noqa: F401 (no_plots is an autouse fixture)
    no_plots,
    MODULES,
    RANK,
    SIZES,
    assert_finite_run,
    ideal_delta,
    make_client,
    make_server,
    random_state,
    run,
    task_metrics,
    updates_for,
)


def random_rotation(seed, rank=RANK):
    gen = torch.Generator().manual_seed(seed)
    return project_so(torch.randn(rank, rank, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("factor", ["A", "B"])
@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_rotation_is_proper_and_keeps_the_product(factor, strength):
    reference, client = random_state(0), random_state(1)
    for name in MODULES:
        R = rotation(client.lora[name], reference.lora[name], factor, strength)
        assert torch.allclose(R.T @ R, torch.eye(RANK, dtype=torch.float64), atol=1e-10)
        assert math.isclose(float(torch.linalg.det(R)), 1.0, abs_tol=1e-10)
        rotated = rotate(client.lora[name], R)
        assert torch.allclose(rotated.delta(), client.lora[name].delta(), atol=1e-5)
        assert not torch.allclose(rotated.A, client.lora[name].A, atol=1e-3)  # it did rotate


def test_zero_strength_is_the_identity_and_a_zero_reference_is_ignored():
    reference, client = random_state(2), random_state(3)
    for factor in "AB":
        R = rotation(client.lora["q"], reference.lora["q"], factor, 0.0)
        assert torch.equal(R, torch.eye(RANK, dtype=torch.float64))
    zero_B = random_state(4, zero_B=True)
    assert torch.equal(rotation(client.lora["q"], zero_B.lora["q"], "B", 1.0), torch.eye(RANK, dtype=torch.float64))


def test_procrustes_rotation_is_the_best_rotation():
    reference, client = random_state(5), random_state(6)
    f, g = client.lora["v"], reference.lora["v"]
    best_A = torch.linalg.norm(rotate(f, rotation(f, g, "A", 1.0)).A - g.A)
    best_B = torch.linalg.norm(rotate(f, rotation(f, g, "B", 1.0)).B - g.B)
    for seed in range(200):
        R = random_rotation(100 + seed)
        assert best_A <= torch.linalg.norm(rotate(f, R).A - g.A) + 1e-5
        assert best_B <= torch.linalg.norm(rotate(f, R).B - g.B) + 1e-5
    # softening moves R from I toward R*: the residual shrinks monotonically in lambda
    errors = [float(torch.linalg.norm(rotate(f, rotation(f, g, "A", lam)).A - g.A)) for lam in (0.0, 0.25, 0.5, 1.0)]
    assert errors == sorted(errors, reverse=True)


def rotated_copies(global_state, seeds):
    """Clients that hold the global update itself in random frames (R_k^T A, B R_k)."""
    states = []
    for seed in seeds:
        lora = {n: rotate(f, random_rotation(seed + i)) for i, (n, f) in enumerate(global_state.lora.items())}
        states.append(AdapterState(lora, global_state.extra))
    return states


@pytest.mark.parametrize("round", [1, 2])
def test_rotated_copies_are_averaged_back_exactly_while_fedit_is_not(round):
    x = random_state(7)
    states = rotated_copies(x, [10, 20, 30, 40])
    client = make_client("fedrot-lora")
    uploads = [client.upload(round, x, s) for s in states]  # round 1 aligns A, round 2 aligns B
    server, fedit = make_server("fedrot-lora", initial=x), make_server("fedit", initial=x)
    server.aggregate(round, updates_for(uploads))
    fedit.aggregate(round, updates_for(states))
    for name in MODULES:
        ideal = ideal_delta(states, name)
        assert torch.allclose(server.global_state.lora[name].delta().double(), ideal, atol=1e-4)
        assert torch.allclose(server.global_state.lora[name].A, x.lora[name].A, atol=1e-4)
        gap = torch.linalg.norm(fedit.global_state.lora[name].delta().double() - ideal)
        assert gap > 0.1 * torch.linalg.norm(ideal)


def test_odd_rounds_align_A_and_even_rounds_align_B():
    x, trained = random_state(8), random_state(9)
    client = make_client("fedrot-lora")
    odd, even = client.upload(1, x, trained), client.upload(2, x, trained)
    for name in MODULES:
        assert torch.allclose(odd.lora[name].A, rotate(trained.lora[name], rotation(trained.lora[name], x.lora[name], "A", 1.0)).A)
        assert torch.allclose(even.lora[name].B, rotate(trained.lora[name], rotation(trained.lora[name], x.lora[name], "B", 1.0)).B)
        assert torch.linalg.norm(odd.lora[name].A - x.lora[name].A) < torch.linalg.norm(trained.lora[name].A - x.lora[name].A)
        assert torch.linalg.norm(even.lora[name].B - x.lora[name].B) < torch.linalg.norm(trained.lora[name].B - x.lora[name].B)
    only_B = make_client("fedrot-lora", align="B").upload(1, x, trained)
    assert torch.allclose(only_B.lora["q"].B, even.lora["q"].B)


def test_pipeline_is_permutation_invariant_and_identical_inputs_keep_the_product():
    x = random_state(11)
    states = [random_state(12 + i) for i in range(4)]
    client = make_client("fedrot-lora", strength=0.7)
    uploads = [client.upload(1, x, s) for s in states]
    results = []
    for order in itertools.permutations(range(4)):
        server = make_server("fedrot-lora", initial=x)
        server.aggregate(1, updates_for([uploads[i] for i in order], [SIZES[i] for i in order], ids=list(order)))
        results.append(server.global_state)
    for other in results[1:]:
        for name in MODULES:
            assert torch.allclose(other.lora[name].A, results[0].lora[name].A, atol=1e-6)
            assert torch.allclose(other.lora[name].B, results[0].lora[name].B, atol=1e-6)
    server = make_server("fedrot-lora", initial=x)
    server.aggregate(1, updates_for([client.upload(1, x, states[0]) for _ in range(4)]))
    for name in MODULES:
        assert torch.allclose(server.global_state.lora[name].delta(), states[0].lora[name].delta(), atol=1e-5)
    # a client that returns the global itself needs no rotation: R* = I exactly
    back = client.upload(1, x, x.clone())
    assert torch.allclose(back.lora["q"].A, x.lora["q"].A, atol=1e-6)


def test_mixed_ranks_are_refused():
    with pytest.raises(ConfigError, match="cannot aggregate different LoRA ranks"):
        check(config_with(["algorithm.name=fedrot-lora", "model.lora.client_ranks={0: 4}"]))


def test_end_to_end_and_zero_strength_is_fedit(tmp_path):
    path, summary = run(tmp_path / "rot", "fedrot-lora")
    assert_finite_run(path, summary)
    zero, _ = run(tmp_path / "zero", "fedrot-lora", **{"algorithm.strength": 0.0})
    fedit, _ = run(tmp_path / "fedit", "fedit")
    assert task_metrics(zero) == task_metrics(fedit)
    assert task_metrics(path) != task_metrics(fedit)
