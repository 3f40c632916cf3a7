"""Free riders: clients that take the global model without training on their data.

Fraboni, Vidal, Lorenzi, "Free-rider Attacks on Model Aggregation in Federated Learning", AISTATS
2021. Threat model: the client follows the protocol's message format but skips local training and
uploads (a) a zero update (plain free riding), (b) Gaussian noise disguised as an update, or (c) a
stale one: the last change of the global model, which looks like a plausible update.
"""

from __future__ import annotations

import torch
from torch import Tensor


def zero_update(like: Tensor) -> Tensor:
    return torch.zeros_like(like)


def noise_update(like: Tensor, stddev: float, generator: torch.Generator | None = None) -> Tensor:
    return torch.normal(0.0, stddev, like.shape, generator=generator, dtype=like.dtype)


def stale_update(previous_global_delta: Tensor, scale: float = 1.0) -> Tensor:
    """The global model's last change θ_t − θ_{t−1}, possibly rescaled, sent as one's own update."""
    return scale * previous_global_delta.clone()


FREE_RIDERS = ("zero", "noise", "stale")
