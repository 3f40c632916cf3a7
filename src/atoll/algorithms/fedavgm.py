"""FedAvgM: FedAvg with server momentum (Hsu, Qi, Brown, "Measuring the Effects of Non-Identical
Data Distribution for Federated Visual Classification", arXiv:1909.06335, 2019).

Pseudo-gradient Delta = sum_k p_k x_k - x on every LoRA factor and head tensor (not the scales).
Server: m <- beta * m + Delta;  x <- x + eta * m  (m_0 = 0). beta = 0 and eta = 1 is FedAvg (FedIT).
Inexact like FedIT: it moves A and B separately, so s * B A is not the average of s * B_k A_k.
"""

from __future__ import annotations

from torch import Tensor

from atoll.algorithms.catalog import SPECS
from atoll.algorithms._fedopt import ServerOptimizer


class FedAvgM(ServerOptimizer):
    """Server momentum on the pseudo-gradient; the momentum buffer is checkpointed."""

    spec = SPECS["fedavgm"]
    moment_names = ("m",)

    def step(self, key: str, delta: Tensor) -> Tensor:
        m = float(self.params.momentum) * self.moments["m"][key] + delta
        self.moments["m"][key] = m
        return float(self.params.server_lr) * m
