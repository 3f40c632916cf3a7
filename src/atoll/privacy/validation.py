"""Validation of every incoming update before aggregation: keys, shape, dtype, finiteness, norm.

A malformed or hostile update (a diverged client, a bug, an attacker sending NaN or a huge vector)
is dropped with the client id and the reason; the round goes on with the others. This is input
validation, not a robustness guarantee: a well-formed malicious update passes it (robust
aggregation is the defense for that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Rejection:
    """One dropped update and why."""

    client_id: int
    reason: str


@dataclass(frozen=True)
class ExpectedPart:
    shape: tuple[int, ...]
    dtype: torch.dtype


def expected_parts(reference: dict[str, Tensor]) -> dict[str, ExpectedPart]:
    """What each part of an upload must look like, from a reference message (e.g. the download)."""
    return {key: ExpectedPart(tuple(t.shape), t.dtype) for key, t in reference.items()}


def check_update(tensors: dict[str, Tensor], expected: dict[str, ExpectedPart], max_part_norm: float | None = None) -> str | None:
    """The first reason ``tensors`` is unacceptable, or None when every part is fine."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        return f"missing part '{missing[0]}'"
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        return f"unexpected part '{unknown[0]}'"
    for key in sorted(tensors):
        tensor, want = tensors[key], expected[key]
        if not isinstance(tensor, Tensor):
            return f"part '{key}' is {type(tensor).__name__}, not a tensor"
        if tuple(tensor.shape) != want.shape:
            return f"part '{key}' has shape {tuple(tensor.shape)}, expected {want.shape}"
        if tensor.dtype != want.dtype:
            return f"part '{key}' has dtype {tensor.dtype}, expected {want.dtype}"
        if tensor.is_floating_point():
            if not bool(torch.isfinite(tensor).all()):
                return f"part '{key}' has NaN or Inf values"
            if max_part_norm is not None:
                norm = float(torch.linalg.vector_norm(tensor.to(torch.float64)))
                if norm > max_part_norm:
                    return f"part '{key}' has L2 norm {norm:.4g} above the bound {max_part_norm:g}"
    return None


def filter_updates(
    uploads: dict[int, dict[str, Tensor]], expected: dict[str, ExpectedPart], max_part_norm: float | None = None
) -> tuple[list[int], list[Rejection]]:
    """Split a round's uploads (client id -> tensors) into accepted ids and rejections."""
    accepted: list[int] = []
    rejected: list[Rejection] = []
    for client_id in sorted(uploads):
        reason = check_update(uploads[client_id], expected, max_part_norm)
        if reason is None:
            accepted.append(client_id)
        else:
            rejected.append(Rejection(client_id, reason))
    return accepted, rejected
