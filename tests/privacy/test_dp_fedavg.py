"""DP-FedAvg: clipping bounds, the fixed denominator, the noise scale, adaptive clipping."""

from __future__ import annotations

import math

import pytest
import torch

from atoll.privacy.dp.adaptive_clipping import AdaptiveClipBound, update_noise_multiplier
from atoll.privacy.dp.clipping import clip_to_norm, l2_norm
from atoll.privacy.dp.dpfedavg import dp_fedavg_mean
from atoll.privacy.errors import PrivacyBudgetError


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_clipped_update_never_exceeds_its_bound(dtype):
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        scale = 10 ** (trial % 7 - 2)
        vector = (torch.randn(257, generator=generator, dtype=torch.float64) * scale).to(dtype)
        bound = float(torch.rand(1, generator=generator)) * 3 + 1e-3
        clipped = clip_to_norm(vector, bound)
        assert clipped.dtype == dtype
        assert l2_norm(clipped) <= bound
        if l2_norm(vector) <= bound:
            assert torch.equal(clipped, vector)
        else:  # same direction, norm at the bound (up to the dtype's precision)
            cosine = torch.nn.functional.cosine_similarity(clipped.double(), vector.double(), dim=0)
            assert float(cosine) > 0.999
            assert l2_norm(clipped) == pytest.approx(bound, rel=2e-3 if dtype == torch.float16 else 1e-6)


def test_clip_by_hand():
    assert torch.equal(clip_to_norm(torch.tensor([3.0, 4.0]), 10.0), torch.tensor([3.0, 4.0]))
    assert torch.allclose(clip_to_norm(torch.tensor([3.0, 4.0]), 1.0), torch.tensor([0.6, 0.8]))


def test_noiseless_mean_divides_the_clipped_sum_by_the_expected_count():
    updates = [torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4]), torch.tensor([-6.0, 8.0])]
    result = dp_fedavg_mean(updates, clip_norm=1.0, noise_multiplier=0.0, expected_clients=4.0)
    expected = (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4]) + torch.tensor([-0.6, 0.8])) / 4.0
    assert torch.allclose(result.mean.float(), expected)
    assert result.clipped == 2


def test_noise_has_standard_deviation_z_times_s_over_expected_count():
    generator = torch.Generator().manual_seed(1)
    updates = [torch.zeros(20000)]
    result = dp_fedavg_mean(updates, clip_norm=2.0, noise_multiplier=1.5, expected_clients=5.0, generator=generator)
    assert result.noise_stddev == pytest.approx(1.5 * 2.0 / 5.0)
    assert float(result.mean.std()) == pytest.approx(0.6, rel=0.03)
    assert abs(float(result.mean.mean())) < 0.02


def test_adaptive_bound_moves_geometrically_toward_the_target_quantile():
    clip = AdaptiveClipBound(bound=1.0, target_quantile=0.5, learning_rate=0.2)
    # 3 of 4 norms under C = 1: b = 0.75 > 0.5, so C shrinks by exp(-0.2 * 0.25)
    new = clip.update([0.1, 0.2, 0.5, 3.0], expected_clients=4.0)
    assert new == pytest.approx(math.exp(-0.05))
    # with fixed norms it converges to a bound between the 2nd and 3rd norm (the median)
    norms = [0.1, 0.3, 0.7, 1.5, 4.0]
    clip = AdaptiveClipBound(bound=10.0, target_quantile=0.5, learning_rate=0.2)
    for _ in range(400):
        clip.update(norms, expected_clients=5.0)
    assert 0.6 < clip.bound < 1.6
    low = AdaptiveClipBound(bound=10.0, target_quantile=0.2, learning_rate=0.2)
    for _ in range(400):
        low.update(norms, expected_clients=5.0)
    assert low.bound < clip.bound


def test_update_noise_multiplier_keeps_the_total_privacy():
    # z_delta^-2 + (2 sigma_b)^-2 = z^-2 (Andrew et al., Theorem 1)
    z, sigma_b = 1.0, 2.0
    z_delta = update_noise_multiplier(z, sigma_b)
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)
    assert z_delta > z
    with pytest.raises(PrivacyBudgetError, match="count_noise_stddev"):
        update_noise_multiplier(1.0, 0.4)


def test_adaptive_dp_fedavg_clips_with_the_current_bound_then_moves_it():
    from atoll.privacy.dp.dpfedavg import AdaptiveDPFedAvg

    clip = AdaptiveClipBound(bound=1.0, target_quantile=0.5, learning_rate=0.2, count_noise_stddev=2.0)
    rounds = AdaptiveDPFedAvg(clip, noise_multiplier=1.0)
    assert rounds.update_noise_multiplier == pytest.approx(update_noise_multiplier(1.0, 2.0))
    noiseless = AdaptiveDPFedAvg(AdaptiveClipBound(bound=1.0, learning_rate=0.2), noise_multiplier=0.0)
    updates = [torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])]
    first = noiseless.aggregate(updates, expected_clients=2.0)
    assert torch.allclose(first.mean.float(), (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4])) / 2)
    assert noiseless.clip.bound == pytest.approx(math.exp(-0.2 * (0.5 - 0.5)))  # one of two under C: b = γ, C stays
    noiseless.aggregate([torch.tensor([0.1, 0.0]), torch.tensor([0.0, 0.2])], expected_clients=2.0)
    assert noiseless.clip.bound == pytest.approx(math.exp(-0.2 * 0.5))  # both under C: C shrinks
