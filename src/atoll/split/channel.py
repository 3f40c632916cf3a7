"""The channel between a data party and the model party: request in, reply out, bytes counted.

The data party drives every exchange; the model party only answers. :class:`LocalChannel` hands
the encoded bytes to a model party in the same process; :class:`~atoll.split.grpc_transport.GrpcChannel`
sends the same bytes over gRPC. Both count the serialised size of every request and reply.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from atoll.errors import AtollError
from atoll.split.wire import Message, Traffic, decode, encode, wire_dtype

ERROR_KIND = "error"


class SplitProtocolError(AtollError):
    """The other party refused a message (mismatched cut or model, unknown session, ...)."""

    kind = "split error"


class Channel:
    """Base: ``call`` encodes a request, delivers it, decodes the reply and counts both."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.traffic = Traffic()
        self.dtype = dtype

    def deliver(self, request: bytes) -> bytes:
        raise NotImplementedError

    def call(self, kind: str, tensors: dict[str, Tensor] | None = None, meta: dict[str, Any] | None = None) -> Message:
        request = encode(Message(kind, wire_dtype(tensors or {}, self.dtype), meta or {}))
        reply_bytes = self.deliver(request)
        self.traffic.add(kind, len(request), len(reply_bytes))
        reply = decode(reply_bytes)
        if reply.kind == ERROR_KIND:
            raise SplitProtocolError(reply.meta.get("message", "the model party failed"), reply.meta.get("fix"))
        reply.tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in reply.tensors.items()}
        return reply

    def close(self) -> None:
        return None


class LocalChannel(Channel):
    """A model party in this process: the same bytes as on a wire, no socket."""

    def __init__(self, handler: Callable[[bytes], bytes], dtype: torch.dtype = torch.float32):
        super().__init__(dtype)
        self.handler = handler

    def deliver(self, request: bytes) -> bytes:
        return self.handler(request)
