"""Privacy accounting of the DP defenses: ε composed over every release a data party made, not per
release.

- Laplace mechanism (pure ε₀-DP per release). After T releases the composed ε is the smaller of
  basic composition, T·ε₀, and the advanced composition theorem of Dwork, Rothblum and Vadhan
  ("Boosting and Differential Privacy", FOCS 2010): ε₀·√(2T·ln(1/δ')) + T·ε₀·(e^ε₀ − 1), which holds
  with an extra δ'.
- Gaussian mechanism. One release with sensitivity Δ and noise σ is μ-Gaussian-DP with μ = Δ/σ
  (Dong, Roth and Su, "Gaussian Differential Privacy", JRSS-B 2022), and T releases compose
  exactly to √T·μ-GDP. μ-GDP converts to (ε, δ) exactly (the same curve as the analytic Gaussian
  mechanism of Balle and Wang, ICML 2018): δ(ε) = Φ(−ε/μ + μ/2) − e^ε·Φ(−ε/μ − μ/2). Per-release
  (ε, δ) in the config are turned into σ with the same curve, so nothing here is an approximation.

Pure functions of numbers: no torch.
"""

from __future__ import annotations

import math


def laplace_scale(epsilon: float, sensitivity: float) -> float:
    """Scale b of Laplace noise giving ε-DP for an L1 sensitivity Δ: b = Δ/ε."""
    return sensitivity / epsilon


def laplace_composed(epsilon: float, releases: int, delta: float) -> tuple[float, float]:
    """(ε, δ) after ``releases`` ε-DP releases: basic composition (δ = 0) or advanced composition
    (with δ' = ``delta``), whichever gives the smaller ε."""
    if releases <= 0:
        return 0.0, 0.0
    basic = releases * epsilon
    if delta <= 0:
        return basic, 0.0
    if epsilon > 50:  # e^ε overflows, and advanced composition cannot beat T·ε there
        return basic, 0.0
    advanced = epsilon * math.sqrt(2 * releases * math.log(1 / delta)) + releases * epsilon * math.expm1(epsilon)
    return (advanced, delta) if advanced < basic else (basic, 0.0)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def _log_phi(x: float) -> float:
    """log Φ(x), accurate in the far left tail too (the asymptotic series of Mills' ratio below −30)."""
    if x > -30:
        return math.log(_phi(x))
    return -x * x / 2 - math.log(-x) - 0.5 * math.log(2 * math.pi) + math.log1p(-1 / x**2 + 3 / x**4)


def gdp_delta(mu: float, epsilon: float) -> float:
    """The exact δ at ε of a μ-GDP mechanism (the Gaussian mechanism with Δ/σ = μ)."""
    if mu <= 0:
        return 0.0
    second = math.exp(min(epsilon + _log_phi(-epsilon / mu - mu / 2), 700.0))
    return max(_phi(-epsilon / mu + mu / 2) - second, 0.0)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ε with δ(ε) ≤ ``delta`` for a μ-GDP mechanism (bisection; δ(ε) decreases in ε)."""
    if mu <= 0:
        return 0.0
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while gdp_delta(mu, high) > delta:
        high *= 2
        if high > 1e15:
            return math.inf
    for _ in range(200):
        middle = (low + high) / 2
        if gdp_delta(mu, middle) > delta:
            low = middle
        else:
            high = middle
    return high


def gdp_mu(epsilon: float, delta: float) -> float:
    """The μ whose μ-GDP curve passes through (ε, δ): the per-release noise Δ/σ of the Gaussian
    mechanism that is exactly (ε, δ)-DP (δ(ε) grows with μ)."""
    low, high = 0.0, 1.0
    while gdp_delta(high, epsilon) < delta:
        high *= 2
        if high > 1e15:
            return math.inf
    for _ in range(200):
        middle = (low + high) / 2
        if gdp_delta(middle, epsilon) < delta:
            low = middle
        else:
            high = middle
    return low


def gaussian_composed(mu: float, releases: int, delta: float) -> float:
    """ε at ``delta`` after ``releases`` Gaussian releases of μ-GDP each (√T·μ-GDP in all)."""
    if releases <= 0:
        return 0.0
    return gdp_epsilon(math.sqrt(releases) * mu, delta)
