"""Flatten the model part of a message into one vector and back.

Clipping, noise, masking and robust aggregation act on one flat float vector per client; the layout
(key order, shapes, dtypes) turns the result back into the tensors the federation expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    """Keys, shapes and dtypes of a flattened tensor dict, in flattening order."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]

    @property
    def numel(self) -> int:
        total = 0
        for shape in self.shapes:
            count = 1
            for size in shape:
                count *= size
            total += count
        return total


def flatten(tensors: dict[str, Tensor]) -> tuple[Tensor, Layout]:
    """One float64 vector of every floating tensor in ``tensors`` (sorted keys), and its layout."""
    keys = tuple(sorted(key for key, tensor in tensors.items() if tensor.is_floating_point()))
    layout = Layout(keys, tuple(tuple(tensors[k].shape) for k in keys), tuple(tensors[k].dtype for k in keys))
    if not keys:
        return torch.zeros(0, dtype=torch.float64), layout
    vector = torch.cat([tensors[k].detach().reshape(-1).to(torch.float64) for k in keys])
    return vector, layout


def unflatten(vector: Tensor, layout: Layout) -> dict[str, Tensor]:
    """The tensors of ``layout`` filled from ``vector`` (cast back to each tensor's dtype)."""
    if vector.numel() != layout.numel:
        raise ValueError(f"vector has {vector.numel()} values, layout needs {layout.numel}")
    tensors: dict[str, Tensor] = {}
    offset = 0
    for key, shape, dtype in zip(layout.keys, layout.shapes, layout.dtypes):
        count = 1
        for size in shape:
            count *= size
        tensors[key] = vector[offset : offset + count].reshape(shape).to(dtype)
        offset += count
    return tensors
