"""Untargeted model poisoning: crafted updates that degrade the global model.

Threat model: the attacker controls the uploads of its clients. Sign flip and Gaussian noise need
nothing else; ALIE, IPM and min-max are omniscient: they see the honest updates of the round
(or estimates of them) before crafting theirs, the strongest standard assumption.

- sign flip: −s · Δ_own (Damaskinos et al. "AGGREGATHOR", SysML 2019 use it as a baseline).
- Gaussian noise: N(0, σ²I) in place of the update (Blanchard et al., NeurIPS 2017).
- ALIE: μ − z·σ per coordinate with z_max = Φ⁻¹((n − s)/n), s = ⌊n/2 + 1⌋ − f (Baruch, Baruch,
  Goldberg, "A Little Is Enough: Circumventing Defenses For Distributed Learning", NeurIPS 2019).
- IPM: −ε · mean of the honest updates (Xie, Koyejo, Gupta, "Fall of Empires: Breaking
  Byzantine-tolerant SGD by Inner Product Manipulation", UAI 2020).
- min-max: μ + γ·p with the largest γ whose maximal distance to any honest update stays within the
  largest distance between two honest updates; p = −μ/‖μ‖ (Shejwalkar, Houmansadr, "Manipulating
  the Byzantine: Optimizing Model Poisoning Attacks and Defenses for Federated Learning", NDSS 2021).
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import torch
from torch import Tensor


@dataclass(frozen=True)
class SignFlip:
    scale: float = 1.0

    def craft(self, own: Tensor, honest: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        return -self.scale * own


@dataclass(frozen=True)
class GaussianNoise:
    stddev: float = 1.0

    def craft(self, own: Tensor, honest: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        return torch.normal(0.0, self.stddev, own.shape, generator=generator, dtype=own.dtype)


def alie_z(num_clients: int, num_attackers: int) -> float:
    """z_max of ALIE: Φ⁻¹((n − s) / n) with s = ⌊n/2 + 1⌋ − f supporters needed."""
    supporters = num_clients // 2 + 1 - num_attackers
    quantile = (num_clients - supporters) / num_clients
    quantile = min(max(quantile, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(quantile)


@dataclass(frozen=True)
class ALIE:
    num_clients: int
    num_attackers: int
    z: float | None = None  # None: the paper's z_max

    def craft(self, own: Tensor, honest: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        if honest is None or honest.shape[0] < 2:
            raise ValueError("ALIE needs at least two honest updates to estimate mean and std")
        z = alie_z(self.num_clients, self.num_attackers) if self.z is None else self.z
        points = honest.to(torch.float64)
        return (points.mean(0) - z * points.std(0, unbiased=True)).to(own.dtype)


@dataclass(frozen=True)
class IPM:
    epsilon: float = 0.5

    def craft(self, own: Tensor, honest: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        if honest is None or honest.shape[0] == 0:
            raise ValueError("IPM needs the honest updates")
        return (-self.epsilon * honest.to(torch.float64).mean(0)).to(own.dtype)


@dataclass(frozen=True)
class MinMax:
    initial_gamma: float = 10.0
    tolerance: float = 1e-5

    def gamma(self, honest: Tensor) -> float:
        """The largest γ with max_i ‖μ + γp − Δ_i‖ ≤ max_{i,j} ‖Δ_i − Δ_j‖ (binary search)."""
        points = honest.to(torch.float64)
        mean = points.mean(0)
        direction = -mean / torch.linalg.vector_norm(mean).clamp_min(1e-30)
        bound = float(torch.cdist(points, points).max())

        def fits(gamma: float) -> bool:
            return float(torch.linalg.vector_norm(points - (mean + gamma * direction), dim=1).max()) <= bound

        low, high = 0.0, self.initial_gamma
        while fits(high):
            low, high = high, high * 2
        while high - low > self.tolerance * max(1.0, high):
            middle = (low + high) / 2
            if fits(middle):
                low = middle
            else:
                high = middle
        return low

    def craft(self, own: Tensor, honest: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        if honest is None or honest.shape[0] < 2:
            raise ValueError("min-max needs at least two honest updates")
        points = honest.to(torch.float64)
        mean = points.mean(0)
        direction = -mean / torch.linalg.vector_norm(mean).clamp_min(1e-30)
        return (mean + self.gamma(honest) * direction).to(own.dtype)


BYZANTINE_ATTACKS = {"sign_flip": SignFlip, "gaussian": GaussianNoise, "alie": ALIE, "ipm": IPM, "min_max": MinMax}
