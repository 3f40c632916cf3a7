"""Coordinate-wise median and trimmed mean.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018. For every coordinate separately: the median of the n values, or the
mean after dropping the ⌊βn⌋ largest and the ⌊βn⌋ smallest values.
"""

from __future__ import annotations

import torch
from torch import Tensor


def coordinate_median(updates: Tensor) -> Tensor:
    """Per-coordinate median of the rows of ``updates`` (n x d); the mean of the middle two for even n."""
    return torch.quantile(updates.to(torch.float64), 0.5, dim=0).to(updates.dtype)


def trimmed_mean(updates: Tensor, trim_fraction: float) -> Tensor:
    """Per-coordinate mean after removing the ⌊βn⌋ largest and smallest values (β < 1/2)."""
    count = updates.shape[0]
    if not 0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    trimmed = int(trim_fraction * count)
    ordered = updates.to(torch.float64).sort(dim=0).values
    return ordered[trimmed : count - trimmed].mean(dim=0).to(updates.dtype)
