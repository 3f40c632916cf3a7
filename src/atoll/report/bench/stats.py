"""The statistics of the comparison table: means with Student-t 95 % intervals over seeds, paired
differences against a reference method over the same seeds, and test-set standard errors.

Pure Python (no scipy on this machine): the t quantile comes from integrating the t density.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def t_density(x: float, df: int) -> float:
    """Density of Student's t distribution with ``df`` degrees of freedom."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int, intervals: int = 600) -> float:
    """P(T <= x) by Simpson's rule on [0, |x|] (the density is smooth and symmetric)."""
    if x == 0:
        return 0.5
    width = abs(x) / intervals
    total = t_density(0.0, df) + t_density(abs(x), df)
    for i in range(1, intervals):
        total += (4 if i % 2 else 2) * t_density(i * width, df)
    area = total * width / 3
    return 0.5 + area if x > 0 else 0.5 - area


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (bisection)."""
    if not 0.5 < probability < 1:
        raise ValueError("probability must be in (0.5, 1)")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < probability:
        low, high = high, high * 2
    for _ in range(45):  # 2^-45 of the bracket: far below the 4 printed digits
        middle = (low + high) / 2
        low, high = (middle, high) if t_cdf(middle, df) < probability else (low, middle)
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values and the half-width of its two-sided 95 % Student-t interval
    (``half`` is nan for a single value: one seed gives no interval)."""

    mean: float
    half: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)


_QUANTILES: dict[int, float] = {}


def mean_interval(values: list[float], confidence: float = 0.95) -> Interval:
    """Mean and 95 % t-interval half-width t_{0.975, n-1} * s / sqrt(n) of ``values``."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, 0)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, math.nan, 1)
    key = n - 1
    if key not in _QUANTILES:
        _QUANTILES[key] = t_quantile(0.5 + confidence / 2, key)
    return Interval(mean, _QUANTILES[key] * statistics.stdev(values) / math.sqrt(n), n)


def paired_interval(values: dict[int, float], reference: dict[int, float]) -> Interval:
    """Mean and 95 % interval of value - reference over the seeds both have (a paired comparison:
    each seed's data, partition and initial adapter are shared by every method)."""
    seeds = sorted(set(values) & set(reference))
    return mean_interval([values[s] - reference[s] for s in seeds])


def binomial_se(proportion: float, count: float) -> float:
    """Standard error sqrt(p (1 - p) / n) of an accuracy measured on ``count`` examples."""
    return math.sqrt(proportion * (1 - proportion) / count) if count > 0 else math.nan
