"""FedIT's defining invariants on random adapter states with unequal client weights."""

import itertools

import torch

from atoll.algorithms import get_algorithm
from atoll.config import config_with
from atoll.fl.base import ServerContext
from atoll.fl.state import AdapterState, LoRAFactors, Update


def random_state(seed, rank=4, scale=2.0, d=7, k=5):
    gen = torch.Generator().manual_seed(seed)
    lora = {m: LoRAFactors(torch.randn(rank, k, generator=gen), torch.randn(d, rank, generator=gen), scale) for m in ("q", "v")}
    return AdapterState(lora, {"head.weight": torch.randn(3, d, generator=gen), "head.bias": torch.randn(3, generator=gen)})


def make_server(clients=4):
    config = config_with([f"federation.clients={clients}"])
    context = ServerContext(config, [10, 20, 30, 40][:clients], [4] * clients, lambda rank: random_state(99))
    return get_algorithm("fedit")(context, get_algorithm("fedit").Params())


def updates_for(states, sizes):
    return [Update(i, n, s) for i, (s, n) in enumerate(zip(states, sizes, strict=True))]


def test_weighted_average_of_every_tensor():
    states = [random_state(i) for i in range(4)]
    sizes = [10, 20, 30, 40]
    server = make_server()
    server.aggregate(1, updates_for(states, sizes))
    weights = [n / 100 for n in sizes]
    for name in ("q", "v"):
        expected_A = sum(w * s.lora[name].A for w, s in zip(weights, states, strict=True))
        expected_B = sum(w * s.lora[name].B for w, s in zip(weights, states, strict=True))
        assert torch.allclose(server.global_state.lora[name].A, expected_A, atol=1e-6)
        assert torch.allclose(server.global_state.lora[name].B, expected_B, atol=1e-6)
    expected_head = sum(w * s.extra["head.weight"] for w, s in zip(weights, states, strict=True))
    assert torch.allclose(server.global_state.extra["head.weight"], expected_head, atol=1e-6)


def test_permutation_invariance():
    states = [random_state(i) for i in range(4)]
    sizes = [10, 20, 30, 40]
    results = []
    for order in itertools.permutations(range(4)):
        server = make_server()
        server.aggregate(1, [Update(i, sizes[i], states[i]) for i in order])
        results.append(server.global_state)
    for other in results[1:]:
        for name in ("q", "v"):
            assert torch.allclose(other.lora[name].A, results[0].lora[name].A, atol=1e-6)
            assert torch.allclose(other.lora[name].B, results[0].lora[name].B, atol=1e-6)


def test_identical_inputs_give_that_input_back():
    state = random_state(3)
    server = make_server()
    server.aggregate(1, updates_for([state.clone() for _ in range(4)], [10, 20, 30, 40]))
    for name in ("q", "v"):
        assert torch.allclose(server.global_state.lora[name].A, state.lora[name].A, atol=1e-6)
        assert torch.allclose(server.global_state.lora[name].B, state.lora[name].B, atol=1e-6)


def test_exact_when_one_factor_is_shared_and_inexact_otherwise():
    sizes = [10, 20, 30, 40]
    weights = [n / 100 for n in sizes]
    shared_A = random_state(0)
    states = []
    for i in range(4):
        s = random_state(10 + i)
        for name in s.lora:
            s.lora[name].A = shared_A.lora[name].A.clone()
        states.append(s)
    server = make_server()
    server.aggregate(1, updates_for(states, sizes))
    for name in ("q", "v"):
        ideal = sum(w * s.lora[name].delta() for w, s in zip(weights, states, strict=True))
        assert torch.allclose(server.global_state.lora[name].delta(), ideal, atol=1e-5)
    # both factors differ: s * mean(B) mean(A) != mean(s B_k A_k)
    states = [random_state(20 + i) for i in range(4)]
    server = make_server()
    server.aggregate(1, updates_for(states, sizes))
    ideal = sum(w * s.lora["q"].delta() for w, s in zip(weights, states, strict=True))
    gap = torch.linalg.norm(server.global_state.lora["q"].delta() - ideal)
    assert gap > 0.1 * torch.linalg.norm(ideal)


def test_sampling_is_seeded_by_round_and_respects_the_rate():
    config = config_with(["federation.clients=20", "federation.sample_rate=0.25"])
    context = ServerContext(config, [5] * 20, [8] * 20, lambda rank: random_state(0))
    server = get_algorithm("fedit")(context, get_algorithm("fedit").Params())
    first = server.sample(3, list(range(20)))
    assert len(first) == 5 and first == server.sample(3, list(range(20)))
    assert any(server.sample(r, list(range(20))) != first for r in range(4, 10))
    assert server.sample(3, [1, 2]) == [1, 2]
