"""Norm bounding: clip every update to L2 norm M before averaging.

Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor Federated Learning?", 2019. A backdoor
scaled up to survive averaging (model replacement) is cut back to the norm of an honest update.
It needs only each update's norm, so it also runs under secure aggregation when clients clip
their own updates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from atoll.privacy.dp.clipping import clip_to_norm


def norm_bounded_mean(updates: Tensor, bound: float, weights: list[float] | None = None) -> Tensor:
    """Weighted mean of the rows of ``updates`` after clipping each to norm ``bound``."""
    count = updates.shape[0]
    weights = [1.0 / count] * count if weights is None else weights
    total = sum(weights)
    clipped = torch.stack([clip_to_norm(row.to(torch.float64), bound) for row in updates])
    mixing = torch.tensor(weights, dtype=torch.float64) / total
    return (mixing[:, None] * clipped).sum(dim=0).to(updates.dtype)
