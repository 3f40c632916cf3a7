"""What travels between the parties: a message is named tensors plus a few scalars, serialised as
one safetensors blob (the scalars in its JSON header). Its byte size is what the traffic counts.

The same bytes cross an in-process channel and a gRPC connection, so the model party decodes
exactly the same tensors in one process as in two, and never holds an object the data party
made (no shared autograd graph, no shared storage).
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

KIND_KEY = "atoll.kind"
META_KEY = "atoll.meta"


@dataclass
class Message:
    """One request or reply: its kind, its tensors, and small JSON-able scalars (ids, flags)."""

    kind: str
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def encode(message: Message) -> bytes:
    from safetensors.torch import save

    tensors = {name: tensor.detach().contiguous() for name, tensor in message.tensors.items()}
    header = {KIND_KEY: message.kind, META_KEY: json.dumps(message.meta, sort_keys=True)}
    return save(tensors, metadata=header)


def decode(data: bytes) -> Message:
    """Bytes -> message; tensors are fresh CPU tensors owned by the receiver."""
    from safetensors.torch import load

    if len(data) < 8:
        raise ValueError("not an atoll split message (too short)")
    header_length = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
    kind = meta.get(KIND_KEY)
    if kind is None:
        raise ValueError("not an atoll split message (no kind in the header)")
    return Message(kind, load(data), json.loads(meta.get(META_KEY, "{}")))


def wire_dtype(tensors: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating tensors cast to the wire's dtype (e.g. bfloat16 halves the bytes); others as they are."""
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


@dataclass
class Traffic:
    """Bytes and messages per direction and kind, as serialised on the wire."""

    to_model: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    to_data: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    messages: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, request_bytes: int, reply_bytes: int) -> None:
        self.to_model[kind] += request_bytes
        self.to_data[kind] += reply_bytes
        self.messages[kind] += 1

    def totals(self) -> dict[str, int]:
        return {"bytes_to_model": sum(self.to_model.values()), "bytes_to_data": sum(self.to_data.values())}

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.totals(),
            "bytes_to_model_by_kind": dict(self.to_model),
            "bytes_to_data_by_kind": dict(self.to_data),
            "messages_by_kind": dict(self.messages),
        }
