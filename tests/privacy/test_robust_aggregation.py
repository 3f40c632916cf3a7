"""Each robust aggregator selects or bounds exactly what its definition says, on inputs checked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from atoll.privacy.robust.coordinatewise import coordinate_median, trimmed_mean
from atoll.privacy.robust.flame import flame, majority_cluster
from atoll.privacy.robust.fltrust import fltrust
from atoll.privacy.robust.krum import krum, krum_scores, multi_krum
from atoll.privacy.robust.norm_bounding import norm_bounded_mean


def test_krum_scores_and_choice_by_hand():
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    # f = 0: each score sums the squared distances to the n - f - 2 = 2 nearest others
    assert krum_scores(points, 0).tolist() == [5.0, 2.0, 5.0, 145.0]
    assert krum(points, 0).selected == [1]
    chosen = multi_krum(points, 0, keep=2)
    assert chosen.selected == [0, 1] and chosen.aggregate.tolist() == [0.5]
    with pytest.raises(ValueError, match="n > 2f"):
        krum_scores(points, 1)


def test_krum_ignores_a_far_away_minority():
    generator = torch.Generator().manual_seed(0)
    honest = torch.randn(7, 50, generator=generator) * 0.1 + 1.0
    attackers = torch.full((2, 50), -20.0)
    updates = torch.cat([honest, attackers])
    assert krum(updates, 2).selected[0] < 7
    assert all(i < 7 for i in multi_krum(updates, 2, keep=5).selected)


def test_coordinate_median_and_trimmed_mean_by_hand():
    rows = torch.tensor([[1.0, 10.0], [2.0, -5.0], [100.0, 0.0]])
    assert coordinate_median(rows).tolist() == [2.0, 0.0]
    even = torch.tensor([[1.0], [3.0], [5.0], [100.0]])
    assert coordinate_median(even).tolist() == [4.0]
    assert trimmed_mean(even, 0.25).tolist() == [4.0]  # drops 1 and 100
    five = torch.tensor([[-50.0], [1.0], [2.0], [3.0], [70.0]])
    assert trimmed_mean(five, 0.2).tolist() == [2.0]
    assert trimmed_mean(five, 0.0).tolist() == [pytest.approx(26 / 5)]


def test_norm_bounding_clips_each_update_before_the_mean():
    rows = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert torch.allclose(norm_bounded_mean(rows, 1.0), torch.tensor([0.3, 0.9]))
    weighted = norm_bounded_mean(rows, 1.0, weights=[3.0, 1.0])
    assert torch.allclose(weighted, torch.tensor([0.45, 0.85]))


def test_fltrust_scores_rescales_and_weights_by_hand():
    server = torch.tensor([1.0, 0.0])
    rows = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0], [1.0, 1.0]])
    result = fltrust(rows, server)
    assert result.trust == pytest.approx([1.0, 0.0, 0.0, 1 / math.sqrt(2)])
    root = 1 / math.sqrt(2)
    expected = torch.tensor([1.0 + root * root, root * root]) / (1.0 + root)
    assert torch.allclose(result.aggregate, expected)
    assert fltrust(torch.tensor([[-1.0, 0.0]]), server).aggregate.tolist() == [0.0, 0.0]


def test_flame_admits_the_majority_cluster_and_clips_to_the_median_norm():
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(40, generator=generator)
    honest = torch.stack([direction * (1 + 0.2 * i) + 0.05 * torch.randn(40, generator=generator) for i in range(5)])
    backdoors = torch.stack([torch.randn(40, generator=generator) * 30 for _ in range(3)])
    updates = torch.cat([honest, backdoors])
    assert majority_cluster(updates) == [0, 1, 2, 3, 4]
    result = flame(updates, noise_factor=0.0)
    norms = torch.linalg.vector_norm(updates.double(), dim=1).sort().values
    bound = float((norms[3] + norms[4]) / 2)  # median of 8 norms
    assert result.clip_bound == pytest.approx(bound)
    expected = torch.stack([row.double() * min(1.0, bound / float(row.double().norm())) for row in honest]).mean(0)
    assert torch.allclose(result.aggregate.double(), expected, atol=1e-5)


def test_flame_noise_is_lambda_times_the_bound():
    updates = torch.ones(3, 20000)
    result = flame(updates, noise_factor=0.01, generator=torch.Generator().manual_seed(0))
    assert result.clip_bound == pytest.approx(math.sqrt(20000))
    assert float((result.aggregate - 1).std()) == pytest.approx(0.01 * math.sqrt(20000), rel=0.03)
