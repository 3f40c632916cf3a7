"""Fusion rules on known log-probabilities, checked against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from atoll.hybrid.fusion import build_support, entropy, fuse, router_weight
from atoll.hybrid.vocab import Aligned


def _aligned(ids: list[int], probs: list[float]) -> Aligned:
    return Aligned(torch.tensor(ids), torch.tensor([math.log(p) for p in probs]), sum(probs))


# an edge vocabulary of 6 tokens; the cloud lists tokens 1, 2, 4 (mass 0.5, 0.3, 0.1; residual 0.1)
EDGE = torch.log(torch.tensor([0.05, 0.10, 0.60, 0.05, 0.10, 0.10]))
BASE = torch.log(torch.tensor([0.05, 0.40, 0.30, 0.05, 0.10, 0.10]))
CLOUD = _aligned([1, 2, 4], [0.5, 0.3, 0.1])


def _expected(scores: dict[int, float]) -> dict[int, float]:
    total = sum(math.exp(v) for v in scores.values())
    return {k: math.exp(v) / total for k, v in scores.items()}


def _as_dict(fused) -> dict[int, float]:
    return {int(i): float(p) for i, p in zip(fused.support, fused.logprobs.exp(), strict=True)}


def test_cloud_only_renormalises_the_top_k():
    fused = fuse("cloud", CLOUD, EDGE)
    assert _as_dict(fused) == pytest.approx({1: 0.5 / 0.9, 2: 0.3 / 0.9, 4: 0.1 / 0.9})
    assert fused.argmax() == 1


def test_weighted_is_a_normalised_geometric_mix_on_the_support():
    fused = fuse("weighted", CLOUD, EDGE, edge_weight=0.25)
    edge = {1: 0.10, 2: 0.60, 4: 0.10}
    cloud = {1: 0.5, 2: 0.3, 4: 0.1}
    expected = _expected({k: 0.25 * math.log(edge[k]) + 0.75 * math.log(cloud[k]) for k in edge})
    assert _as_dict(fused) == pytest.approx(expected, rel=1e-5)
    assert sum(_as_dict(fused).values()) == pytest.approx(1.0)
    # weight 1 gives the edge restricted to the support; weight 0 the cloud
    assert fuse("weighted", CLOUD, EDGE, edge_weight=1.0).argmax() == 2
    assert fuse("weighted", CLOUD, EDGE, edge_weight=0.0).argmax() == 1


def test_proxy_tuning_adds_the_tuned_minus_base_offset_to_the_cloud():
    fused = fuse("proxy", CLOUD, EDGE, BASE, alpha=1.0)
    # cloud * tuned / base on {1, 2, 4}: 0.5*0.1/0.4, 0.3*0.6/0.3, 0.1*0.1/0.1
    expected = _expected({1: math.log(0.125), 2: math.log(0.6), 4: math.log(0.1)})
    assert _as_dict(fused) == pytest.approx(expected, rel=1e-5)
    assert fused.argmax() == 2  # the tuned edge moved mass to token 2 and the cloud follows
    assert fuse("proxy", CLOUD, EDGE, BASE, alpha=0.0).argmax() == 1  # alpha 0 is the cloud
    with pytest.raises(ValueError):
        fuse("proxy", CLOUD, EDGE, None)


def test_router_weights_the_more_confident_model_more():
    edge_on_support = EDGE[torch.tensor([1, 2, 4])]
    cloud_on_support = CLOUD.logprobs
    h_edge = -sum(p * math.log(p) for p in (0.125, 0.75, 0.125))  # edge renormalised on {1,2,4}
    h_cloud = -sum(p * math.log(p) for p in (5 / 9, 3 / 9, 1 / 9))
    assert entropy(edge_on_support) == pytest.approx(h_edge, rel=1e-5)
    weight = router_weight(edge_on_support, cloud_on_support)
    assert weight == pytest.approx(math.exp(-h_edge) / (math.exp(-h_edge) + math.exp(-h_cloud)), rel=1e-5)
    assert weight > 0.5  # the edge is the sharper of the two here
    fused = fuse("router", CLOUD, EDGE)
    assert fused.edge_weight == pytest.approx(weight)
    assert _as_dict(fused) == pytest.approx(_as_dict(fuse("weighted", CLOUD, EDGE, edge_weight=weight)), rel=1e-5)
    # a uniform (maximally unsure) edge gets less weight than a sharp cloud
    flat = torch.full((6,), math.log(1 / 6))
    assert router_weight(flat[torch.tensor([1, 2, 4])], cloud_on_support) < 0.5


def test_union_support_gives_edge_only_tokens_the_cloud_bound():
    edge = torch.log(torch.tensor([0.05, 0.10, 0.55, 0.05, 0.10, 0.15]))  # edge top-2: 2 (listed by the cloud) and 5
    ids, cloud = build_support(CLOUD, edge, "union", top_k=2)
    assert ids.tolist() == [1, 2, 4, 5]
    assert float(cloud[3]) == pytest.approx(math.log(0.1))  # min(p_k = 0.1, residual = 0.1)
    assert build_support(CLOUD, edge, "cloud", top_k=2)[0].tolist() == [1, 2, 4]
    low_residual = _aligned([1, 2, 4], [0.5, 0.3, 0.19])
    _, bounded = build_support(low_residual, edge, "union", top_k=2)
    assert float(bounded[-1]) == pytest.approx(math.log(0.01), rel=1e-4)  # residual 0.01 < p_k 0.19


def test_empty_cloud_support_fuses_nothing():
    empty = Aligned(torch.tensor([], dtype=torch.long), torch.tensor([]), 0.0)
    assert fuse("weighted", empty, EDGE) is None
