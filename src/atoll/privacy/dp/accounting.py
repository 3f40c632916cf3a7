"""Privacy accounting for the sampled Gaussian mechanism with opacus' accountants.

A DP-FedAvg round (or a DP-SGD step) is a sampled Gaussian mechanism: sampling rate q, noise
multiplier z. Composed over T rounds it is (ε, δ)-DP with ε from Rényi DP (Mironov, "Rényi
Differential Privacy", CSF 2017; Mironov, Talwar, Zhang, "Rényi Differential Privacy of the Sampled
Gaussian Mechanism", 2019) or from privacy random variables (Gopi, Lee, Wutschitz, "Numerical
Composition of Differential Privacy", NeurIPS 2021). Both come from opacus; atoll does no privacy
math of its own here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from atoll.privacy.errors import PrivacyBudgetError

ACCOUNTANTS = ("rdp", "prv")


def _make(kind: str):
    if kind not in ACCOUNTANTS:
        raise PrivacyBudgetError(f"unknown accountant '{kind}'", f"use one of {', '.join(ACCOUNTANTS)}")
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if kind == "rdp" else PRVAccountant()


class PrivacyAccountant:
    """Tracks the rounds of a sampled Gaussian mechanism and reports ε at a fixed δ."""

    def __init__(self, kind: str = "rdp"):
        self.kind = kind
        self._accountant = _make(kind)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` rounds with noise multiplier z and sampling rate q."""
        if noise_multiplier <= 0:
            raise PrivacyBudgetError("a round without noise has no finite ε", "set a noise multiplier > 0")
        if not 0 < sample_rate <= 1:
            raise PrivacyBudgetError(f"sampling rate {sample_rate} is outside (0, 1]", "check federation.sample_rate")
        for _ in range(steps):
            self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    @property
    def rounds(self) -> int:
        return sum(int(steps) for _, _, steps in self._accountant.history)

    def epsilon(self, delta: float) -> float:
        """ε of everything recorded so far at ``delta`` (0 before the first round)."""
        if not self._accountant.history:
            return 0.0
        return float(self._accountant.get_epsilon(delta=delta))

    def state(self) -> list[tuple[float, float, int]]:
        """The history (z, q, steps) that determines ε: enough to checkpoint and restore."""
        return [(float(z), float(q), int(n)) for z, q, n in self._accountant.history]

    def restore(self, history: list[tuple[float, float, int]]) -> None:
        self._accountant = _make(self.kind)
        self._accountant.history = [(float(z), float(q), int(n)) for z, q, n in history]


def epsilon_after(noise_multiplier: float, sample_rate: float, rounds: int, delta: float, kind: str = "rdp") -> float:
    """ε at ``delta`` after ``rounds`` rounds of the sampled Gaussian mechanism (z, q)."""
    accountant = PrivacyAccountant(kind)
    accountant.step(noise_multiplier, sample_rate, rounds)
    return accountant.epsilon(delta)


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, rounds: int, kind: str = "rdp") -> float:
    """The smallest noise multiplier whose ε after ``rounds`` stays at or under ``target_epsilon``.

    Bisection on z (ε falls monotonically as z grows), to a relative tolerance of 1e-4 in ε,
    returning the upper end so the target is never exceeded.
    """
    if target_epsilon <= 0 or not math.isfinite(target_epsilon):
        raise PrivacyBudgetError(f"target ε {target_epsilon} must be a positive number", "set dp.target_epsilon > 0")
    low, high = 0.0, 1.0
    while epsilon_after(high, sample_rate, rounds, delta, kind) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise PrivacyBudgetError(f"no noise multiplier up to 1e4 reaches ε {target_epsilon}", "raise the target ε or lower rounds")
    for _ in range(60):
        middle = (low + high) / 2
        if middle <= 0:
            break
        if epsilon_after(middle, sample_rate, rounds, delta, kind) > target_epsilon:
            low = middle
        else:
            high = middle
        if high - low < 1e-4 * high:
            break
    return high


@dataclass(frozen=True)
class PrivacyBudget:
    """An (ε, δ) budget: a run stops before the round that would spend past it."""

    epsilon: float
    delta: float

    def allows_round(self, accountant: PrivacyAccountant, noise_multiplier: float, sample_rate: float) -> bool:
        """Whether one more round (z, q) keeps the accountant's ε at δ within the budget."""
        trial = PrivacyAccountant(accountant.kind)
        trial.restore(accountant.state())
        trial.step(noise_multiplier, sample_rate)
        return trial.epsilon(self.delta) <= self.epsilon
