"""L2 clipping of one client's update to a bound S: Δ · min(1, S / ‖Δ‖₂).

The clipping step of DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent
Language Models", ICLR 2018) and of norm bounding (Sun et al., "Can You Really Backdoor Federated
Learning?", 2019). It bounds each client's contribution, so the sum has L2 sensitivity S.
"""

from __future__ import annotations

import torch
from torch import Tensor


def l2_norm(vector: Tensor) -> float:
    """‖vector‖₂ computed in float64 (no overflow for float16/float32 inputs)."""
    return float(torch.linalg.vector_norm(vector.detach().to(torch.float64)))


def clip_to_norm(vector: Tensor, bound: float) -> Tensor:
    """``vector`` scaled down to L2 norm at most ``bound`` (unchanged when already inside).

    The result never exceeds ``bound`` in its own dtype: rounding after the scaling is corrected,
    so the sensitivity the privacy accounting assumes holds exactly.
    """
    if bound < 0:
        raise ValueError(f"clipping bound must be >= 0, got {bound}")
    norm = l2_norm(vector)
    if norm <= bound:
        return vector.clone()
    if not torch.isfinite(torch.tensor(norm)):
        raise ValueError("cannot clip a vector with non-finite values; validate updates first")
    factor = bound / norm
    clipped = (vector.to(torch.float64) * factor).to(vector.dtype)
    # float rounding can leave the norm a few ulps above the bound: shrink until it is not
    while l2_norm(clipped) > bound:
        factor *= 1.0 - 1e-7 if vector.dtype == torch.float64 else 1.0 - 2e-7 if vector.dtype == torch.float32 else 1.0 - 1e-3
        clipped = (vector.to(torch.float64) * factor).to(vector.dtype)
    return clipped
