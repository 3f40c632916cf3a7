"""The types aggregation code works on: LoRA factors with their scale, adapter states, updates.

No PEFT key strings live here (they are translated in :mod:`atoll.models.adapters`), so every
algorithm can be tested with random tensors and no model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor

from atoll.errors import UpdateError


@dataclass
class LoRAFactors:
    """One adapted module: W = W0 + scale * B @ A, with A: r x in_features and B: out_features x r."""

    A: Tensor
    B: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> Tensor:
        """The dense update scale * B @ A (in float32)."""
        return self.scale * (self.B.float() @ self.A.float())

    def clone(self) -> "LoRAFactors":
        return LoRAFactors(self.A.clone(), self.B.clone(), self.scale)


@dataclass
class AdapterState:
    """What a client downloads, trains and uploads.

    ``lora``: module name -> LoRA factors. ``extra``: named dense tensors trained with the adapter
    (a classifier head, a router, control variates). ``base``: module name -> dense delta that has
    been merged into the frozen base weight (FLoRA, FedEx-LoRA residuals); empty for most algorithms.
    """

    lora: dict[str, LoRAFactors] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)
    base: dict[str, Tensor] = field(default_factory=dict)

    # -- construction helpers ------------------------------------------------------------------
    def clone(self) -> "AdapterState":
        return AdapterState(
            {name: factors.clone() for name, factors in self.lora.items()},
            {name: t.clone() for name, t in self.extra.items()},
            {name: t.clone() for name, t in self.base.items()},
        )

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> "AdapterState":
        return AdapterState(
            {n: LoRAFactors(fn(f.A), fn(f.B), f.scale) for n, f in self.lora.items()},
            {n: fn(t) for n, t in self.extra.items()},
            {n: fn(t) for n, t in self.base.items()},
        )

    def effective_delta(self, name: str) -> Tensor:
        """The whole update of module ``name`` relative to the pristine base weight:
        merged base delta (if any) + scale * B @ A. Exact algorithms preserve this."""
        delta = self.lora[name].delta() if name in self.lora else None
        if name in self.base:
            merged = self.base[name].float()
            delta = merged if delta is None else merged + delta
        if delta is None:
            raise KeyError(name)
        return delta

    def modules(self) -> list[str]:
        return sorted(set(self.lora) | set(self.base))

    def ranks(self) -> dict[str, int]:
        return {name: factors.rank for name, factors in self.lora.items()}

    def rank(self) -> int:
        """The common rank of all modules (0 when there is no LoRA module)."""
        ranks = set(self.ranks().values())
        if len(ranks) > 1:
            raise UpdateError(f"adapter has mixed ranks {sorted(ranks)}")
        return ranks.pop() if ranks else 0

    # -- flat tensor dicts (the message format) -------------------------------------------------
    def to_tensors(self) -> dict[str, Tensor]:
        """Flatten into ``{key: tensor}`` (safetensors-ready; scales travel as 0-d float64 tensors)."""
        tensors: dict[str, Tensor] = {}
        for name, factors in self.lora.items():
            tensors[f"lora.{name}.A"] = factors.A
            tensors[f"lora.{name}.B"] = factors.B
            tensors[f"lora.{name}.s"] = torch.tensor(float(factors.scale), dtype=torch.float64)
        for name, tensor in self.extra.items():
            tensors[f"extra.{name}"] = tensor
        for name, tensor in self.base.items():
            tensors[f"base.{name}"] = tensor
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "AdapterState":
        state = cls()
        pending: dict[str, dict[str, Tensor]] = {}
        for key, tensor in tensors.items():
            kind, _, rest = key.partition(".")
            if kind == "lora":
                name, _, which = rest.rpartition(".")
                if which not in ("A", "B", "s") or not name:
                    raise UpdateError(f"message key '{key}' is not lora.<module>.A, .B or .s")
                pending.setdefault(name, {})[which] = tensor
            elif kind == "extra":
                state.extra[rest] = tensor
            elif kind == "base":
                state.base[rest] = tensor
            else:
                raise UpdateError(f"message key '{key}' has unknown kind '{kind}'")
        for name, parts in pending.items():
            if set(parts) != {"A", "B", "s"}:
                raise UpdateError(f"module '{name}' arrived without A, B and its scale")
            state.lora[name] = LoRAFactors(parts["A"], parts["B"], float(parts["s"]))
        return state

    def nbytes(self) -> int:
        """Size of this state serialised as a safetensors message (what a transfer costs)."""
        tensors = self.to_tensors()
        return safetensors_size(tensors) if tensors else 0

    def numel(self) -> int:
        return sum(t.numel() for t in self.to_tensors().values())


_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_size(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> int:
    """Exact byte length of ``safetensors.torch.save(tensors, metadata)`` without serialising data."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name in sorted(tensors, key=lambda n: (-_alignment(tensors[n]), n)):
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    length = len(text.encode())
    length += (-length) % 8  # safetensors pads the header to a multiple of 8 bytes
    return 8 + length + offset


def _alignment(tensor: Tensor) -> int:
    return tensor.element_size()


@dataclass
class Update:
    """What a client sends back after local training."""

    client_id: int
    num_examples: int
    state: AdapterState
    metrics: dict[str, float] = field(default_factory=dict)


def example_weights(updates: Iterable[Update]) -> list[float]:
    """p_k = n_k / sum_j n_j over the given updates."""
    updates = list(updates)
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        return [1.0 / len(updates)] * len(updates)
    return [u.num_examples / total for u in updates]


def check_finite(update: Update) -> None:
    """Refuse updates carrying NaN or Inf (a diverged or hostile client)."""
    for key, tensor in update.state.to_tensors().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UpdateError(f"client {update.client_id} sent non-finite values in '{key}'", "lower train.lr")
