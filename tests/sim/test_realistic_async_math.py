"""BaseServer's asynchronous rules on random tensors: FedAsync mixing with constant, polynomial and
hinge staleness (Xie et al. 2019), and FedBuff's buffered step (Nguyen et al., AISTATS 2022)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from atoll.config import config_with
from atoll.fl.base import AsyncRule, BaseServer, ServerContext
from atoll.fl.state import AdapterState, LoRAFactors, Update
from atoll.errors import UpdateError


def random_state(seed: int, rank: int = 4) -> AdapterState:
    generator = torch.Generator().manual_seed(seed)
    lora = {
        f"layer{i}.q": LoRAFactors(torch.randn(rank, 6, generator=generator), torch.randn(5, rank, generator=generator), 2.0)
        for i in range(2)
    }
    return AdapterState(lora, {"head.weight": torch.randn(3, 5, generator=generator)})


def server_with(state: AdapterState) -> BaseServer:
    context = ServerContext(config_with([]), [10, 10, 10], [4, 4, 4], lambda rank: state.clone())
    return BaseServer(context, BaseServer.Params())


def tensors(state: AdapterState) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.to_tensors().items() if not k.endswith(".s")}


@pytest.mark.parametrize("staleness", [0, 1, 2, 3, 7, 20])
def test_staleness_weights_match_their_formulas(staleness):
    assert AsyncRule(staleness="constant").weight(staleness) == 1.0
    assert AsyncRule(staleness="polynomial", a=0.5).weight(staleness) == pytest.approx((staleness + 1) ** -0.5)
    hinge = AsyncRule(staleness="hinge", a=2.0, b=3)
    expected = 1.0 if staleness <= 3 else 1.0 / (2.0 * (staleness - 3) + 1.0)
    assert hinge.weight(staleness) == pytest.approx(expected)


def test_hinge_uses_the_papers_sign_and_weights_never_increase_with_staleness():
    hinge = AsyncRule(staleness="hinge", a=0.5, b=4)
    # just past b the weight is 1 / (a + 1); the sign error 1 / (a (t + b) + 1) would give 1 / 3.5
    assert hinge.weight(5) == pytest.approx(1.0 / 1.5)
    for kind in ("constant", "polynomial", "hinge"):
        rule = AsyncRule(staleness=kind, a=0.7, b=2)
        weights = [rule.weight(t) for t in range(30)]
        assert weights[0] == 1.0
        assert all(later <= earlier for earlier, later in pairwise(weights))
    with pytest.raises(ValueError):
        AsyncRule().weight(-1)


@pytest.mark.parametrize("kind, staleness", [("constant", 5), ("polynomial", 3), ("hinge", 9)])
def test_fedasync_mixes_every_tensor_with_alpha_times_staleness_weight(kind, staleness):
    current, incoming = random_state(0), random_state(1)
    server = server_with(current)
    rule = AsyncRule(alpha=0.6, staleness=kind, a=0.5, b=4)
    server.aggregate_async(1, Update(2, 10, incoming), staleness, rule)
    alpha = 0.6 * rule.weight(staleness)
    mixed = tensors(server.global_state)
    for key, value in tensors(current).items():
        assert torch.allclose(mixed[key], (1 - alpha) * value + alpha * tensors(incoming)[key], atol=1e-6), key
    assert all(f.scale == 2.0 for f in server.global_state.lora.values())


def test_fedasync_with_no_staleness_and_alpha_one_adopts_the_update():
    current, incoming = random_state(0), random_state(1)
    server = server_with(current)
    server.aggregate_async(1, Update(0, 10, incoming), 0, AsyncRule(alpha=1.0))
    for key, value in tensors(incoming).items():
        assert torch.allclose(tensors(server.global_state)[key], value)


def test_fedasync_leaves_factors_a_partial_message_omits_unchanged():
    current, incoming = random_state(0), random_state(1).without("B")  # an A-only message
    server = server_with(current)
    server.aggregate_async(1, Update(0, 10, incoming), 0, AsyncRule(alpha=0.5))
    for name, factors in server.global_state.lora.items():
        assert torch.equal(factors.B, current.lora[name].B)
        assert torch.allclose(factors.A, 0.5 * current.lora[name].A + 0.5 * incoming.lora[name].A)


def test_fedasync_refuses_a_different_rank():
    server = server_with(random_state(0, rank=4))
    with pytest.raises(UpdateError, match="shape"):
        server.aggregate_async(1, Update(0, 10, random_state(1, rank=8)), 0, AsyncRule())


def test_fedbuff_steps_by_the_mean_staleness_weighted_delta():
    current = random_state(0)
    starts = [random_state(10), current.clone(), random_state(11)]
    finals = [random_state(20), random_state(21), random_state(22)]
    staleness = [0, 2, 5]
    rule = AsyncRule(staleness="polynomial", a=0.5, server_lr=0.8)
    server = server_with(current)
    server.aggregate_buffered(3, [Update(k, 10, s) for k, s in enumerate(finals)], staleness, starts, rule)
    result = tensors(server.global_state)
    for key, value in tensors(current).items():
        step = sum(rule.weight(t) * (tensors(f)[key] - tensors(s)[key]) for f, s, t in zip(finals, starts, staleness, strict=True)) / 3
        assert torch.allclose(result[key], value + 0.8 * step, atol=1e-5), key


def test_fedbuff_of_unchanged_clients_changes_nothing():
    current = random_state(0)
    server = server_with(current)
    server.aggregate_buffered(1, [Update(0, 10, current.clone()), Update(1, 10, current.clone())], [0, 3], [current, current], AsyncRule())
    for key, value in tensors(current).items():
        assert torch.allclose(tensors(server.global_state)[key], value)
