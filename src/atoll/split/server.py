"""The model party's process: ``atoll split serve CONFIG`` (or ``python -m atoll.split.server``).

It loads nothing but the config until the first data party says hello; then it builds its slice
from the model registry, answers until a ``finish`` request, writes its adapter and what it
received into its output directory, and exits. ``atoll split run`` with ``split.transport: grpc``
and no ``split.address`` starts one of these on loopback and talks to it over gRPC.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

READY = "atoll-split-model-party-ready"


def serve(
    config_path: Path,
    out_dir: Path,
    host: str = "127.0.0.1",
    port: int = 0,
    announce=print,
    certificate: Path | None = None,
    key: Path | None = None,
) -> int:
    """Serve until a data party sends ``finish``; returns the number of requests answered."""
    import torch

    from atoll.split.config import load_split_config
    from atoll.split.grpc_transport import ModelPartyServer
    from atoll.split.model_party import ModelParty

    config = load_split_config(config_path)
    torch.set_num_threads(config.run.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    party = ModelParty(config, out_dir)
    done = threading.Event()
    answered = 0

    def handler(request: bytes) -> bytes:
        nonlocal answered
        reply = party.handle(request)
        answered += 1
        if party.finished:
            done.set()
        return reply

    server = ModelPartyServer(handler, host, port, certificate, key).start()
    announce(f"{READY} {server.port}")
    done.wait()
    server.stop(grace=2.0)
    return answered


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="atoll split learning: the model party over gRPC")
    parser.add_argument("config", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="where the model party writes its adapter and what it received")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--certificate", type=Path, default=None, help="TLS certificate (PEM) of the model party")
    parser.add_argument("--key", type=Path, default=None, help="its private key (PEM)")
    arguments = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s model party: %(message)s", stream=sys.stderr)
    from atoll.errors import AtollError

    try:
        serve(
            arguments.config,
            arguments.out,
            arguments.host,
            arguments.port,
            announce=lambda line: print(line, flush=True),
            certificate=arguments.certificate,
            key=arguments.key,
        )
    except AtollError as error:
        print(f"atoll: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
