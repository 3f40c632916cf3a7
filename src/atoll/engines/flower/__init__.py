"""The Flower engine: the same BaseServer/BaseClient objects, driven through Flower's Message API.

``app`` holds the ServerApp and ClientApp (``atoll.engines.flower.app:server_app`` / ``:client_app``);
``driver`` starts a run from ``atoll run --engine flower`` (a private simulation SuperLink, or an
existing deployment); ``checks`` refuses combinations that cannot work; ``processes`` and ``certs``
back the ``atoll flower`` helpers that start SuperLinks and SuperNodes. Flower is imported lazily,
so the rest of atoll works without it. See docs/flower.md.
"""

from __future__ import annotations

from typing import Any


def start_flower_run(run, progress) -> tuple[Any, dict[str, Any]]:
    """Run a resolved run on Flower; returns (RunDir, summary) like the local engine's ``start_run``."""
    from atoll.engines.flower.driver import start_flower_run as start

    return start(run, progress)
