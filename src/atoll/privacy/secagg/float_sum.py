"""Secure aggregation of float updates: optional client-side clipping, quantisation, the masked
protocol, and decoding of the sum. This is how secure aggregation composes with client-level DP:
each client clips its own update (the bound is then enforced where the data is), the server learns
only the sum of the clipped, quantised updates, and adds the Gaussian noise of DP-FedAvg to it.
Against the server itself that is central DP with a server trusted to add its noise; against
everyone who sees the released model it is the (ε, δ) of the accountant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from atoll.privacy.dp.clipping import clip_to_norm
from atoll.privacy.errors import SecureAggregationError
from atoll.privacy.secagg.protocol import Dropouts, SecAggResult, secure_sum
from atoll.privacy.secagg.quantize import Quantizer


@dataclass
class SecureFloatSum:
    total: Tensor
    protocol: SecAggResult


def secure_float_sum(
    updates: dict[int, Tensor],
    quantizer: Quantizer,
    threshold: int,
    dropouts: Dropouts = Dropouts(),
    clip_norm: float | None = None,
    generator: torch.Generator | None = None,
) -> SecureFloatSum:
    """Σ over the clients whose masked input arrived of quantise(clip(Δ_u)); float64 result."""
    if len(updates) > quantizer.max_clients():
        raise SecureAggregationError(
            f"{len(updates)} clients overflow the {quantizer.modulus_bits}-bit ring at {quantizer.levels} levels",
            "lower the quantisation levels or raise modulus_bits",
        )
    encoded = {}
    for client_id, update in sorted(updates.items()):
        flat = update.reshape(-1)
        if clip_norm is not None:
            flat = clip_to_norm(flat.to(torch.float64), clip_norm)
        encoded[client_id] = quantizer.encode(flat, generator)
    result = secure_sum(encoded, threshold, quantizer.modulus_bits, dropouts)
    return SecureFloatSum(quantizer.decode_sum(result.total, len(result.included)), result)
