"""Fixed-point quantisation of float vectors into the ring Z_R, R = 2^bits, and back.

Masking needs integers: Bonawitz et al. (CCS 2017) sum vectors in Z_R. A value x is clipped to
[−c, c] and mapped to round(x · L / c) in [−L, L] (L = ``levels``), stored mod R. A sum of n such
values decodes exactly while n · L < R / 2, so the result is the exact sum of the quantised inputs.
Stochastic rounding (floor plus a Bernoulli draw of the fractional part) makes the quantised value
unbiased, as in Flower's SecAgg+.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Quantizer:
    """Maps [−clip_range, clip_range] onto integers in [−levels, levels], kept mod 2^modulus_bits."""

    clip_range: float = 8.0
    levels: int = 2**22
    modulus_bits: int = 32

    def __post_init__(self) -> None:
        if not 8 <= self.modulus_bits <= 62:
            raise ValueError("modulus_bits must be in [8, 62]")
        if self.levels < 1 or 2 * self.levels >= 2**self.modulus_bits:
            raise ValueError("levels must be >= 1 and below half the modulus")

    @property
    def modulus(self) -> int:
        return 2**self.modulus_bits

    @property
    def bytes_per_value(self) -> int:
        return (self.modulus_bits + 7) // 8

    def max_clients(self) -> int:
        """The most inputs whose sum still decodes without wrapping around."""
        return (self.modulus // 2 - 1) // self.levels

    def to_integers(self, vector: Tensor, generator: torch.Generator | None = None) -> np.ndarray:
        """Signed integers round(x·L/c) (stochastic rounding when a generator is given)."""
        scaled = vector.detach().reshape(-1).to(torch.float64).clamp(-self.clip_range, self.clip_range) * (self.levels / self.clip_range)
        if generator is None:
            rounded = torch.round(scaled)
        else:
            floor = torch.floor(scaled)
            rounded = floor + (torch.rand(scaled.shape, generator=generator, dtype=torch.float64) < (scaled - floor)).to(torch.float64)
        return rounded.numpy().astype(np.int64)

    def encode(self, vector: Tensor, generator: torch.Generator | None = None) -> np.ndarray:
        """The vector as elements of Z_R (uint64 holding values < R)."""
        return self.to_ring(self.to_integers(vector, generator))

    def to_ring(self, integers: np.ndarray) -> np.ndarray:
        return (integers.astype(np.int64) % self.modulus).astype(np.uint64)

    def decode_sum(self, total: np.ndarray, count: int) -> Tensor:
        """The float sum of ``count`` encoded vectors from their sum in Z_R."""
        if count > self.max_clients():
            raise ValueError(f"{count} inputs overflow a {self.modulus_bits}-bit ring at {self.levels} levels")
        signed = total.astype(np.int64)
        signed = np.where(signed >= self.modulus // 2, signed - self.modulus, signed)
        return torch.from_numpy(signed.astype(np.float64) * (self.clip_range / self.levels))

    def dequantize(self, integers: np.ndarray) -> Tensor:
        """Float values of signed integers from :meth:`to_integers`."""
        return torch.from_numpy(integers.astype(np.float64) * (self.clip_range / self.levels))
