"""FedAdagrad: closed forms with v the running sum tau^2 + sum of Delta^2 (OpenFedLLM's version
accumulates the wrong quantity), permutation invariance, zero pseudo-gradient, checkpointed moments."""

import itertools

import pytest
import torch

from atoll.config import config_with
from atoll.resolve import check
from atoll.errors import ConfigError
from optsvd_helpers import (  # noqa: F401 (no_plots is an autouse fixture)
    no_plots,
    SIZES,
    assert_finite_run,
    make_server,
    optimised,
    pseudo_gradient,
    random_state,
    run,
    updates_for,
)

NAME = "fedadagrad"
PARAMS = {"server_lr": 0.3, "beta1": 0.8, "tau": 0.5}


def second_moment(v, delta):
    """The defining rule of this optimiser's v."""
    return v + delta**2


def test_first_step_closed_form_with_unequal_weights():
    x0 = random_state(0, scale=1.5)
    states = [random_state(1 + i, scale=1.5) for i in range(4)]
    server = make_server(NAME, initial=x0, **PARAMS)
    server.aggregate(1, updates_for(states))
    delta = pseudo_gradient(x0, states)
    tau, eta, beta1 = PARAMS["tau"], PARAMS["server_lr"], PARAMS["beta1"]
    signs = set()
    for key, value in optimised(server.global_state).items():
        v = second_moment(torch.full_like(delta[key], tau**2), delta[key])
        m = (1 - beta1) * delta[key]
        expected = optimised(x0)[key] + eta * m / (v.sqrt() + tau)
        assert torch.allclose(value, expected, atol=1e-5), key
        assert torch.allclose(server.moments["v"][key], v, atol=1e-6)
        signs |= set(torch.sign(tau**2 - delta[key] ** 2).flatten().tolist())
    assert {-1.0, 1.0} <= signs  # both branches of any sign rule were exercised
    assert all(f.scale == 1.5 for f in server.global_state.lora.values())  # scales never move


def test_second_step_closed_form():
    x0 = random_state(10)
    first, second = [random_state(11 + i) for i in range(4)], [random_state(21 + i) for i in range(4)]
    server = make_server(NAME, initial=x0, **PARAMS)
    server.aggregate(1, updates_for(first))
    x1 = server.global_state.clone()
    m1 = {k: t.clone() for k, t in server.moments["m"].items()}
    v1 = {k: t.clone() for k, t in server.moments["v"].items()}
    server.aggregate(2, updates_for(second))
    delta = pseudo_gradient(x1, second)
    for key, value in optimised(server.global_state).items():
        m = PARAMS["beta1"] * m1[key] + (1 - PARAMS["beta1"]) * delta[key]
        v = second_moment(v1[key], delta[key])
        expected = optimised(x1)[key] + PARAMS["server_lr"] * m / (v.sqrt() + PARAMS["tau"])
        assert torch.allclose(value, expected, atol=1e-5), key


def test_permutation_invariance_and_a_zero_pseudo_gradient_leaves_x():
    x0 = random_state(30)
    states = [random_state(31 + i) for i in range(4)]
    results = []
    for order in itertools.permutations(range(4)):
        server = make_server(NAME, initial=x0)
        server.aggregate(1, updates_for([states[i] for i in order], [SIZES[i] for i in order], ids=list(order)))
        results.append(optimised(server.global_state))
    for other in results[1:]:
        for key in other:
            assert torch.allclose(other[key], results[0][key], atol=1e-5)
    # identical inputs do not come back (the step is eta * m / (sqrt(v) + tau)); what the math
    # implies is that clients returning x itself give Delta = 0 and leave x where it is (m_0 = 0)
    server = make_server(NAME, initial=x0, **PARAMS)
    server.aggregate(1, updates_for([x0.clone() for _ in range(4)]))
    for key, value in optimised(server.global_state).items():
        assert torch.equal(value, optimised(x0)[key])
    moved = make_server(NAME, initial=x0, **PARAMS)
    moved.aggregate(1, updates_for([states[0].clone() for _ in range(4)]))
    step = {k: v - optimised(x0)[k] for k, v in optimised(moved.global_state).items()}
    for key, value in step.items():
        toward = optimised(states[0])[key] - optimised(x0)[key]
        assert bool((value * toward >= 0).all()), key  # every coordinate moves toward the common input


def test_state_dict_carries_both_moments():
    x0 = random_state(40)
    first, second = [random_state(41 + i) for i in range(4)], [random_state(51 + i) for i in range(4)]
    server = make_server(NAME, initial=x0, **PARAMS)
    server.aggregate(1, updates_for(first))
    restored = make_server(NAME, initial=random_state(98), **PARAMS)
    restored.load_state_dict(server.state_dict())
    server.aggregate(2, updates_for(second))
    restored.aggregate(2, updates_for(second))
    for key, value in optimised(server.global_state).items():
        assert torch.equal(value, optimised(restored.global_state)[key])


def test_mixed_ranks_are_refused():
    with pytest.raises(ConfigError, match="cannot aggregate different LoRA ranks"):
        check(config_with([f"algorithm.name={NAME}", "model.lora.client_ranks={0: 4}"]))


def test_end_to_end(tmp_path):
    path, summary = run(tmp_path, NAME)
    assert_finite_run(path, summary)
