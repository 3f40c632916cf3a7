"""FLTrust: trust bootstrapped from a small clean root dataset held by the server.

Cao, Fang, Liu, Gong, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS 2021. The server trains on its root data to get Δ_0; client i's trust score is
TS_i = ReLU(cos(Δ_i, Δ_0)); its update is rescaled to ‖Δ_0‖; the aggregate is
Σ TS_i · (‖Δ_0‖/‖Δ_i‖) Δ_i / Σ TS_i (zero when no client has positive trust).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TrustedAggregate:
    aggregate: Tensor
    trust: list[float]


def fltrust(updates: Tensor, server_update: Tensor) -> TrustedAggregate:
    """FLTrust aggregate of the rows of ``updates`` given the server's root-data update Δ_0."""
    points = updates.to(torch.float64)
    reference = server_update.reshape(-1).to(torch.float64)
    reference_norm = torch.linalg.vector_norm(reference)
    norms = torch.linalg.vector_norm(points, dim=1)
    cosine = (points @ reference) / (norms * reference_norm).clamp_min(1e-30)
    trust = torch.relu(cosine)
    if float(trust.sum()) <= 0:
        return TrustedAggregate(torch.zeros_like(reference).to(updates.dtype), trust.tolist())
    rescaled = points * (reference_norm / norms.clamp_min(1e-30))[:, None]
    aggregate = (trust[:, None] * rescaled).sum(dim=0) / trust.sum()
    return TrustedAggregate(aggregate.to(updates.dtype), trust.tolist())
