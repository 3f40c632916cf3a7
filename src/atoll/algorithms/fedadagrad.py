"""FedAdagrad (Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2).

Pseudo-gradient Delta = sum_k p_k x_k - x on every LoRA factor and head tensor (never the scales).
Server: m <- b1 m + (1 - b1) Delta;
        v <- v + Delta^2 (Adagrad: the sum of all squared pseudo-gradients; beta2 is not used);
        x <- x + eta * m / (sqrt(v) + tau),   with m_0 = 0 and v_0 = tau^2.
Inexact like FedIT: A and B move separately, so s * B A is not the average of s * B_k A_k.
"""

from __future__ import annotations

from torch import Tensor

from atoll.algorithms.catalog import SPECS
from atoll.algorithms._fedopt import AdaptiveServerOptimizer


class FedAdagrad(AdaptiveServerOptimizer):
    """Server-side Adagrad on the pseudo-gradient; m and v are checkpointed."""

    spec = SPECS["fedadagrad"]

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return v + delta_sq
