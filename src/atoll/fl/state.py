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
    """One adapted module: W = W0 + scale * B @ A, with A: r x in_features and B: out_features x r.

    In a message either factor may be absent (None): an algorithm that sends only B (FFA-LoRA,
    FedSVD, RoLoRA's B-rounds) or only A (FedSA-LoRA) leaves the other out. ``rank`` is known from
    the factor that is present."""

    A: Tensor | None
    B: Tensor | None
    scale: float

    @property
    def rank(self) -> int:
        if self.A is not None:
            return int(self.A.shape[0])
        if self.B is not None:
            return int(self.B.shape[1])
        raise UpdateError("LoRA factors with neither A nor B")

    @property
    def complete(self) -> bool:
        return self.A is not None and self.B is not None

    def delta(self) -> Tensor:
        """The dense update scale * B @ A (in float32); both factors must be present."""
        if not self.complete:
            raise UpdateError("a LoRA module without both factors has no dense update")
        return self.scale * (self.B.float() @ self.A.float())

    def clone(self) -> "LoRAFactors":
        return LoRAFactors(_clone(self.A), _clone(self.B), self.scale)

    def without(self, which: str) -> "LoRAFactors":
        """These factors with ``which`` ('A' or 'B') left out (for a partial message)."""
        if which == "A":
            return LoRAFactors(None, self.B, self.scale)
        if which == "B":
            return LoRAFactors(self.A, None, self.scale)
        raise ValueError(f"factor must be 'A' or 'B', got {which!r}")


def _clone(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.clone()


@dataclass
class AdapterState:
    """What a client downloads, trains and uploads: a typed message.

    - ``lora``: module name -> LoRA factors (A and B each optional in a partial message);
    - ``extra``: the other trainable tensors, federated like the factors (a classifier head,
      PEFT's modules_to_save, routers, RAVAN's cores): model data;
    - ``base``: module name -> dense delta merged into the frozen base weight (FLoRA, FedEx-LoRA,
      FlexLoRA residuals); empty for most algorithms;
    - ``control``: the algorithm's control data, never loaded into the model (SCAFFOLD's
      variates, FLoRA's stacked factors, FedLEASE's cluster id, digests).

    Protections act on the model part (``model_tensors``) and leave control data alone; byte
    counting and the codec see every part.
    """

    lora: dict[str, LoRAFactors] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)
    base: dict[str, Tensor] = field(default_factory=dict)
    control: dict[str, Tensor] = field(default_factory=dict)

    # -- construction helpers ------------------------------------------------------------------
    def clone(self) -> "AdapterState":
        return AdapterState(
            {name: factors.clone() for name, factors in self.lora.items()},
            {name: t.clone() for name, t in self.extra.items()},
            {name: t.clone() for name, t in self.base.items()},
            {name: t.clone() for name, t in self.control.items()},
        )

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> "AdapterState":
        def apply(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else fn(tensor)

        return AdapterState(
            {n: LoRAFactors(apply(f.A), apply(f.B), f.scale) for n, f in self.lora.items()},
            {n: fn(t) for n, t in self.extra.items()},
            {n: fn(t) for n, t in self.base.items()},
            {n: fn(t) for n, t in self.control.items()},
        )

    def without(self, which: str, extra: bool = True) -> "AdapterState":
        """A partial message: every module's ``which`` factor left out (and the extras unless
        ``extra``); no base and no control data."""
        return AdapterState({name: f.without(which) for name, f in self.lora.items()}, dict(self.extra) if extra else {})

    def completed(self, source: "AdapterState", which: str) -> "AdapterState":
        """A full adapter: this message with its ``which`` factor cloned from ``source``."""
        if which not in ("A", "B"):
            raise ValueError(f"factor must be 'A' or 'B', got {which!r}")
        lora = {}
        for name, f in self.lora.items():
            other = source.lora[name]
            lora[name] = LoRAFactors(other.A.clone(), f.B, f.scale) if which == "A" else LoRAFactors(f.A, other.B.clone(), f.scale)
        return AdapterState(lora, dict(self.extra), dict(self.base), dict(self.control))

    def model_tensors(self) -> dict[str, Tensor]:
        """The model part of the message, keyed like :meth:`to_tensors`: the LoRA factors present
        and the other trainable tensors (what clipping, noise, masking and validation act on)."""
        tensors: dict[str, Tensor] = {}
        for name, factors in self.lora.items():
            if factors.A is not None:
                tensors[f"lora.{name}.A"] = factors.A
            if factors.B is not None:
                tensors[f"lora.{name}.B"] = factors.B
        for name, tensor in self.extra.items():
            tensors[f"extra.{name}"] = tensor
        return tensors

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
        """Flatten into ``{key: tensor}`` (safetensors-ready). Keys: ``lora.<m>.A``, ``.B`` and
        ``.s`` (the scale, a 0-d float64), ``extra.<n>``, ``base.<n>``, ``control.<n>``. An absent
        factor travels as an empty tensor that keeps the module's rank (r x 0 for A, 0 x r for B):
        no payload bytes, and the receiver knows the rank of a module it gets only one factor of."""
        tensors: dict[str, Tensor] = {}
        for name, factors in self.lora.items():
            rank = factors.rank
            tensors[f"lora.{name}.A"] = factors.A if factors.A is not None else factors.B.new_empty(rank, 0)
            tensors[f"lora.{name}.B"] = factors.B if factors.B is not None else factors.A.new_empty(0, rank)
            tensors[f"lora.{name}.s"] = torch.tensor(float(factors.scale), dtype=torch.float64)
        for name, tensor in self.extra.items():
            tensors[f"extra.{name}"] = tensor
        for name, tensor in self.base.items():
            tensors[f"base.{name}"] = tensor
        for name, tensor in self.control.items():
            tensors[f"control.{name}"] = tensor
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "AdapterState":
        state = cls()
        pending: dict[str, dict[str, Tensor]] = {}
        parts = {"extra": state.extra, "base": state.base, "control": state.control}
        for key, tensor in tensors.items():
            kind, _, rest = key.partition(".")
            if kind == "lora":
                name, _, which = rest.rpartition(".")
                if which not in ("A", "B", "s") or not name:
                    raise UpdateError(f"message key '{key}' is not lora.<module>.A, .B or .s")
                pending.setdefault(name, {})[which] = tensor
            elif kind in parts:
                parts[kind][rest] = tensor
            else:
                raise UpdateError(f"message key '{key}' has unknown kind '{kind}'")
        for name, factors in pending.items():
            if set(factors) != {"A", "B", "s"}:
                raise UpdateError(f"module '{name}' arrived without A, B and its scale")
            A, B = factors["A"], factors["B"]
            if A.numel() == 0 and B.numel() == 0:
                raise UpdateError(f"module '{name}' arrived with neither A nor B")
            state.lora[name] = LoRAFactors(A if A.numel() else None, B if B.numel() else None, float(factors["s"]))
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
