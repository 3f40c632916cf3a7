"""FedAvgM: momentum 0 with server_lr 1 is FedAvg; the momentum recursion over rounds; scales are
never moved; checkpointed momentum resumes exactly."""

import itertools

import pytest
import torch

from atoll.algorithms._fedopt import optimised_keys
from atoll.config import config_with
from atoll.resolve import check
from atoll.errors import ConfigError
from atoll.report.progress import Progress
from atoll.dispatch import resume_run
from optsvd_helpers import (  # noqa: F401 (no_plots is an autouse fixture)
    no_plots,
    MODULES,
    SIZES,
    StopAfter,
    assert_finite_run,
    make_server,
    random_state,
    run,
    task_metrics,
    updates_for,
    weights_of,
)


def flat(state):
    tensors = state.to_tensors()
    return {k: tensors[k] for k in optimised_keys(state)}


def test_zero_momentum_unit_step_is_fedavg_with_unequal_weights():
    x = random_state(0)
    states = [random_state(i + 1) for i in range(4)]
    server = make_server("fedavgm", initial=x, momentum=0.0, server_lr=1.0)
    fedit = make_server("fedit", initial=x)
    server.aggregate(1, updates_for(states))
    fedit.aggregate(1, updates_for(states))
    ours, reference = flat(server.global_state), flat(fedit.global_state)
    assert set(ours) == set(reference) and any(k.startswith("extra.") for k in ours)
    for key in ours:
        assert torch.allclose(ours[key], reference[key], atol=1e-6), key


def test_momentum_recursion_over_two_rounds_and_scales_untouched():
    x0 = random_state(10, scale=0.7)
    rounds = [[random_state(20 + 4 * r + i, scale=0.7) for i in range(4)] for r in range(2)]
    server = make_server("fedavgm", initial=x0, momentum=0.8, server_lr=0.5)
    weights = weights_of()
    x = flat(x0)
    m = {k: torch.zeros_like(v) for k, v in x.items()}
    for r, states in enumerate(rounds):
        server.aggregate(r + 1, updates_for(states))
        for key in x:
            delta = sum(w * flat(s)[key] for w, s in zip(weights, states, strict=True)) - x[key]
            m[key] = 0.8 * m[key] + delta
            x[key] = x[key] + 0.5 * m[key]
    for key, value in flat(server.global_state).items():
        assert torch.allclose(value, x[key], atol=1e-5), key
        assert torch.allclose(server.moments["m"][key], m[key], atol=1e-5)
    assert all(f.scale == 0.7 for f in server.global_state.lora.values())


def test_permutation_invariance_and_identical_inputs_in_the_first_round():
    x0 = random_state(30)
    states = [random_state(31 + i) for i in range(4)]
    results = []
    for order in itertools.permutations(range(4)):
        server = make_server("fedavgm", initial=x0)
        server.aggregate(1, updates_for([states[i] for i in order], [SIZES[i] for i in order], ids=list(order)))
        results.append(flat(server.global_state))
    for other in results[1:]:
        for key in other:
            assert torch.allclose(other[key], results[0][key], atol=1e-5)
    # m_0 = 0, so with eta = 1 the first step lands on the clients' common state whatever beta is
    server = make_server("fedavgm", initial=x0, momentum=0.9, server_lr=1.0)
    server.aggregate(1, updates_for([states[0].clone() for _ in range(4)]))
    for name in MODULES:
        assert torch.allclose(server.global_state.lora[name].A, states[0].lora[name].A, atol=1e-6)


def test_state_dict_carries_the_momentum():
    x0 = random_state(40)
    first, second = [random_state(41 + i) for i in range(4)], [random_state(51 + i) for i in range(4)]
    server = make_server("fedavgm", initial=x0)
    server.aggregate(1, updates_for(first))
    restored = make_server("fedavgm", initial=random_state(99))
    restored.load_state_dict(server.state_dict())
    server.aggregate(2, updates_for(second))
    restored.aggregate(2, updates_for(second))
    for key, value in flat(server.global_state).items():
        assert torch.equal(value, flat(restored.global_state)[key])


def test_mixed_ranks_are_refused():
    with pytest.raises(ConfigError, match="cannot aggregate different LoRA ranks"):
        check(config_with(["algorithm.name=fedavgm", "model.lora.client_ranks={0: 4}"]))


def test_end_to_end_and_resume(tmp_path):
    extra = {"federation.rounds": 3}
    full, summary = run(tmp_path / "full", "fedavgm", **extra)
    assert_finite_run(full, summary)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", "fedavgm", progress=StopAfter(2), **extra)
    cut = next((tmp_path / "cut").iterdir())
    resume_run(cut, Progress())
    assert task_metrics(cut) == task_metrics(full)
