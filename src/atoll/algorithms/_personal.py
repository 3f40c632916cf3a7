"""Helpers for personal client state: an adapter stored with the digest of the global it came from
(as control data: never loaded into the model, never federated)."""

from __future__ import annotations

import dataclasses
import hashlib

import torch
from torch import Tensor

from atoll.fl.state import AdapterState

DIGEST = "digest"  # control entry: the digest of the global a personal adapter was derived from


def state_digest(state: AdapterState) -> str:
    """A content hash of ``state`` (keys, dtypes, shapes and bytes): which global a personal
    adapter was derived from."""
    digest = hashlib.blake2b(digest_size=16)
    tensors = state.to_tensors()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pack(state: AdapterState, digest: str | None = None) -> dict[str, Tensor]:
    """``state`` (plus the digest of its global) as a store entry."""
    control = dict(state.control)
    if digest is not None:
        control[DIGEST] = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)
    return dataclasses.replace(state, control=control).to_tensors()


def unpack(tensors: dict[str, Tensor]) -> tuple[AdapterState, str | None]:
    """(the adapter, the digest of its global or None) from a store entry written by :func:`pack`."""
    state = AdapterState.from_tensors(tensors)
    stored = state.control.pop(DIGEST, None)
    return state, (bytes(stored.tolist()).hex() if stored is not None else None)
