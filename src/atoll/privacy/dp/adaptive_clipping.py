"""Adaptive clipping to a target quantile of the update norms.

Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive Clipping",
NeurIPS 2021. Each sampled client reports b_i = 1[‖Δ_i‖ ≤ C]; the server forms the noisy fraction
b̄ = (Σ b_i + N(0, σ_b²)) / m with m the expected number of clients, and updates the bound
geometrically, C ← C · exp(−η_C (b̄ − γ)), which drives C toward the γ-quantile of the norms.
The count costs privacy too: to keep the privacy of a noise multiplier z for the whole round, the
update sum gets z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (their Theorem 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atoll.privacy.errors import PrivacyBudgetError


def update_noise_multiplier(noise_multiplier: float, count_noise_stddev: float) -> float:
    """z_Δ for the update sum when the clipped-count query uses noise σ_b (Andrew et al., Thm. 1)."""
    if noise_multiplier <= 0:
        return 0.0
    if count_noise_stddev <= 0:
        raise PrivacyBudgetError("adaptive clipping with DP noise needs noise on the clipped count", "set count_noise_stddev > 0")
    remaining = noise_multiplier**-2 - (2.0 * count_noise_stddev) ** -2
    if remaining <= 0:
        raise PrivacyBudgetError(
            f"count noise {count_noise_stddev} is too small for noise multiplier {noise_multiplier}",
            f"set count_noise_stddev > {noise_multiplier / 2:g} (the paper suggests expected clients / 20)",
        )
    return remaining**-0.5


@dataclass
class AdaptiveClipBound:
    """The clipping bound C, tracked toward the ``target_quantile`` of client update norms."""

    bound: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_stddev: float = 0.0

    def __post_init__(self) -> None:
        if self.bound <= 0:
            raise ValueError("initial clipping bound must be > 0")
        if not 0.0 <= self.target_quantile <= 1.0:
            raise ValueError("target_quantile must be in [0, 1]")

    def update(self, norms: list[float], expected_clients: float, generator: torch.Generator | None = None) -> float:
        """One round: count the norms at or under C, add the count noise, move C; returns the new C."""
        unclipped = sum(1.0 for norm in norms if norm <= self.bound)
        if self.count_noise_stddev > 0:
            unclipped += float(torch.normal(0.0, self.count_noise_stddev, (1,), generator=generator, dtype=torch.float64))
        fraction = unclipped / expected_clients
        self.bound *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return self.bound
