"""The real wire: the model party as a gRPC service, the data party as its client.

One unary method carries a request's bytes (see :mod:`atoll.split.wire`) and returns the reply's
bytes; gRPC frames them over HTTP/2. The service handles one request at a time, in order, as
the in-process channel does, so both give the same numbers. With a TLS certificate and key the
server may bind any address and the data party verifies it against a CA certificate; without
them both ends refuse anything but loopback, so activations never cross a network in plaintext.
"""

from __future__ import annotations

import ipaddress
import threading
from concurrent import futures
from pathlib import Path
from typing import Callable

import torch

from atoll.errors import ConfigError
from atoll.split.channel import Channel, SplitProtocolError

SERVICE = "atoll.split.ModelParty"
METHOD = f"/{SERVICE}/Call"
MAX_MESSAGE = 1 << 30  # 1 GiB: the logits of a large batch are big


def _options() -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError:
        raise ConfigError(f"cannot read the TLS {what} '{path}'", "check the path") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ModelPartyServer:
    """Serves ``handler`` (bytes -> bytes) until :meth:`stop`; one request at a time."""

    def __init__(
        self,
        handler: Callable[[bytes], bytes],
        host: str = "127.0.0.1",
        port: int = 0,
        certificate: Path | None = None,
        key: Path | None = None,
    ):
        import grpc

        if (certificate is None) != (key is None):
            raise ConfigError("TLS needs both a certificate and its key", "give both --certificate and --key, or neither")
        if certificate is None and not is_loopback(host):
            raise ConfigError(
                f"refusing to serve the model party on '{host}' without TLS", "give --certificate and --key, or bind 127.0.0.1"
            )
        self._lock = threading.Lock()

        def call(request: bytes, context) -> bytes:
            with self._lock:
                return handler(request)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=_options())
        method = grpc.unary_unary_rpc_method_handler(call)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Call": method}),))
        if certificate is not None and key is not None:
            credentials = grpc.ssl_server_credentials([(_read(key, "key"), _read(certificate, "certificate"))])
            self.port = self.server.add_secure_port(f"{host}:{port}", credentials)
        else:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise ConfigError(f"cannot bind {host}:{port}", "choose a free port")
        self.host = host

    def start(self) -> "ModelPartyServer":
        self.server.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()


class GrpcChannel(Channel):
    """The data party's end of a gRPC connection to the model party."""

    def __init__(self, address: str, timeout: float = 600.0, dtype: torch.dtype = torch.float32, root_certificates: Path | None = None):
        import grpc

        super().__init__(dtype)
        self.address = address
        self.timeout = timeout
        host = address.rsplit(":", 1)[0].strip("[]")
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(_read(root_certificates, "CA certificate"))
            self._channel = grpc.secure_channel(address, credentials, options=_options())
        elif is_loopback(host):
            self._channel = grpc.insecure_channel(address, options=_options())
        else:
            raise ConfigError(
                f"refusing to send activations to '{address}' in plaintext",
                "set split.root_certificates to the CA certificate of the model party's TLS certificate",
            )
        self._call = self._channel.unary_unary(METHOD)

    def wait_ready(self, timeout: float) -> None:
        import grpc

        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise SplitProtocolError(f"no model party answers at {self.address}", "start it with `atoll split serve`") from None

    def deliver(self, request: bytes) -> bytes:
        import grpc

        try:
            return self._call(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise SplitProtocolError(
                f"the model party at {self.address} did not answer: {error.code().name} {error.details()}",
                "check that `atoll split serve` is running, or raise split.timeout",
            ) from None

    def close(self) -> None:
        self._channel.close()
