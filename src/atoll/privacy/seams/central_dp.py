"""Client-level DP-FedAvg as the federation runs it: the clipping bound, the noise, the accountant.

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR
2018; adaptive bound after Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021. A round clips each
client's change to S, adds N(0, z²S²) to the sum and divides by the expected number of sampled
clients m = ceil(qN) (fixed, whoever answered); the accountant records one sampled Gaussian
mechanism (z, q = m/N) per round and reports ε at δ. With ``budget_epsilon`` the run stops before
a round would spend past it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from atoll.privacy.dp.accounting import PrivacyAccountant, PrivacyBudget
from atoll.privacy.dp.adaptive_clipping import AdaptiveClipBound, update_noise_multiplier
from atoll.privacy.dp.clipping import clip_to_norm, l2_norm


class ClientLevelDP:
    """The DP-FedAvg mechanism of one run (see the module docstring)."""

    def __init__(self, settings, expected_clients: int, num_clients: int):
        self.settings = settings
        self.expected_clients = expected_clients
        self.sample_rate = expected_clients / num_clients
        self.noise_multiplier = float(settings.noise_multiplier if settings.noise_multiplier is not None else 1.0)
        self.adaptive = settings.mode == "adaptive"
        count_noise = settings.count_noise_stddev if settings.count_noise_stddev is not None else expected_clients / 20.0
        if not self.adaptive or self.noise_multiplier == 0:
            count_noise = 0.0  # no privacy asked: the clipped count is exact
        self.bound = AdaptiveClipBound(settings.clip_norm, settings.target_quantile, settings.clip_lr, count_noise)
        # with an adaptive bound the clipped count costs privacy too: the sum gets z_Δ > z (Andrew et al., Thm. 1)
        self.sum_noise_multiplier = update_noise_multiplier(self.noise_multiplier, count_noise) if self.adaptive else self.noise_multiplier
        self.accountant = PrivacyAccountant(settings.accountant)
        self.budget = PrivacyBudget(settings.budget_epsilon, settings.delta) if settings.budget_epsilon is not None else None
        self.clipped: int | None = None  # known only where the server sees the updates
        self.released = 0

    @property
    def clip_norm(self) -> float:
        return float(self.bound.bound)

    def clip(self, vector: Tensor) -> Tensor:
        """One client's change clipped to the current bound."""
        return clip_to_norm(vector.to(torch.float64), self.clip_norm)

    def noisy_mean(self, total: Tensor, generator: torch.Generator) -> Tensor:
        """(sum of clipped changes + N(0, z_Δ² S²)) / m."""
        stddev = self.sum_noise_multiplier * self.clip_norm
        if stddev > 0:
            total = total + torch.normal(0.0, stddev, total.shape, generator=generator, dtype=torch.float64)
        return total / self.expected_clients

    def clip_and_sum(self, vectors: list[Tensor]) -> Tensor:
        """Σ clip(Δ_k, S), counting how many were clipped."""
        total = torch.zeros_like(vectors[0], dtype=torch.float64)
        self.clipped = 0
        for vector in vectors:
            self.clipped += int(l2_norm(vector) > self.clip_norm)
            total += self.clip(vector)
        return total

    def move_bound(self, norms: list[float], generator: torch.Generator) -> None:
        """Adaptive clipping: the noisy unclipped count moves S toward the target quantile."""
        if self.adaptive:
            self.bound.update(norms, self.expected_clients, generator)

    def account(self) -> None:
        """One released round of the sampled Gaussian mechanism (z, q)."""
        self.released += 1
        if self.noise_multiplier > 0:
            self.accountant.step(self.noise_multiplier, self.sample_rate)

    def epsilon(self) -> float | None:
        if self.noise_multiplier <= 0:
            return None
        return self.accountant.epsilon(self.settings.delta)

    def metrics(self) -> dict[str, float]:
        result = {"dp_noise_multiplier": self.noise_multiplier, "dp_delta": float(self.settings.delta), "dp_rounds": float(self.released)}
        epsilon = self.epsilon()
        if epsilon is not None:
            result["dp_epsilon"] = epsilon
        result["dp_clip_norm"] = self.clip_norm
        if self.clipped is not None:
            result["dp_clipped"] = float(self.clipped)
        return result

    def stop_reason(self) -> str | None:
        """Why the next round may not run: it would spend past the budget."""
        if self.budget is None or self.noise_multiplier <= 0:
            return None
        if self.budget.allows_round(self.accountant, self.noise_multiplier, self.sample_rate):
            return None
        spent = self.accountant.epsilon(self.budget.delta)
        return f"privacy budget: another round would spend past epsilon {self.budget.epsilon:g} at delta {self.budget.delta:g} (spent {spent:.4g})"

    def state(self) -> dict:
        return {"history": self.accountant.state(), "bound": self.clip_norm, "released": self.released}

    def load_state(self, state: dict) -> None:
        self.accountant.restore([tuple(entry) for entry in state.get("history", [])])
        self.bound.bound = float(state.get("bound", self.bound.bound))
        self.released = int(state.get("released", 0))


def expected_sampled(sample_rate: float, clients: int) -> int:
    return max(1, int(math.ceil(sample_rate * clients - 1e-9)))
