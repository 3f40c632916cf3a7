"""Refuse Flower settings that cannot work, with one line that says why and what to do.

These are the checks the config alone decides (addresses, TLS, SecAgg+ parameters). Which
algorithms may run under SecAgg+ or the DP wrappers (those whose capabilities declare a
weighted-mean aggregation) is decided with every other capability in :mod:`atoll.compat`.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from atoll.errors import ConfigError

if TYPE_CHECKING:
    from atoll.config import Config

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ConfigError when malformed."""
    text = address.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"'{address}' is not host:port", "write e.g. 127.0.0.1:9093 or superlink.example.org:9093")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_insecure(host: str, what: str) -> None:
    """Plain HTTP only on loopback: anything else must use TLS."""
    if not is_loopback(host):
        raise ConfigError(
            f"{what} on '{host}' without TLS: insecure mode is only allowed on loopback (127.0.0.1, ::1, localhost)",
            "give TLS certificates (see `atoll flower certs` and docs/flower.md)",
        )


def check_flower_settings(config: "Config") -> None:
    """Everything about ``engine: flower`` that the config alone decides (what it asks of the
    algorithm is :func:`atoll.compat.check_engine`'s)."""
    if config.engine != "flower":
        return
    flower = config.flower
    if getattr(config, "mode", "prototype") != "prototype":
        raise ConfigError(
            f"engine: flower runs synchronous rounds; mode '{config.mode}' is the local event simulator",
            "use mode: prototype with engine: flower",
        )
    clients = config.federation.clients
    if flower.min_available_clients is not None and flower.min_available_clients > clients:
        raise ConfigError(
            f"flower.min_available_clients={flower.min_available_clients} exceeds federation.clients={clients}",
            "lower it or add clients",
        )
    secagg, dp = flower.secagg, flower.dp
    if secagg.enabled and dp.mode != "none":
        raise ConfigError(
            "flower.secagg and flower.dp cannot be combined: Flower's SecAgg+ runs in its legacy API and its DP wrappers in the Message API",
            "choose one of them",
        )
    if dp.mode in ("server-adaptive", "client-adaptive") and dp.noise_multiplier > 0:
        # Flower's adaptive wrappers split z between the update and the clipped count (std sampled/20),
        # which is only possible for z < 2 * sampled/20; past it they raise when the ServerApp starts
        limit = _sampled(config) / 10
        if dp.noise_multiplier >= limit:
            raise ConfigError(
                f"flower.dp.noise_multiplier={dp.noise_multiplier} is too large for adaptive clipping with {_sampled(config)} "
                f"clients per round (Flower's count noise allows z < sampled / 10 = {limit:g})",
                "lower flower.dp.noise_multiplier, sample more clients per round, or use a fixed-clipping mode",
            )
    if secagg.enabled:
        sampled = _sampled(config)
        if sampled < 2:
            raise ConfigError(
                f"SecAgg+ needs at least 2 clients per round, this config samples {sampled}", "raise federation.sample_rate or clients"
            )
        if isinstance(secagg.num_shares, int) and secagg.num_shares != 1 and secagg.num_shares <= 2:
            raise ConfigError("flower.secagg.num_shares must be an integer > 2 or a fraction in (0, 1]")
        if isinstance(secagg.num_shares, float) and secagg.num_shares > 1:
            raise ConfigError("flower.secagg.num_shares as a fraction must be in (0, 1]")
        threshold = secagg.reconstruction_threshold
        if isinstance(threshold, float) and threshold > 1:
            raise ConfigError("flower.secagg.reconstruction_threshold as a fraction must be in (0, 1]")
        if isinstance(threshold, int) and isinstance(secagg.num_shares, int) and secagg.num_shares > 1 and threshold >= secagg.num_shares:
            raise ConfigError("flower.secagg.reconstruction_threshold must be smaller than num_shares")
        if config.model.dtype == "bfloat16":
            raise ConfigError("SecAgg+ quantizes float32 uploads; model.dtype bfloat16 is not supported with it", "use model.dtype float32")
    if flower.node_data:
        check_node_data(config)
    if flower.mode == "deployment":
        if not flower.superlink:
            raise ConfigError(
                "flower.mode: deployment needs flower.superlink (host:port of a running SuperLink)", "see `atoll flower superlink --help`"
            )
        host, _ = split_address(flower.superlink)
        if flower.insecure:
            check_insecure(host, "flower.superlink")
        elif not flower.root_certificates:
            raise ConfigError(
                "flower.superlink uses TLS but flower.root_certificates is not set",
                "point it at the CA certificate (ca.crt from `atoll flower certs`), or set flower.insecure: true on loopback",
            )


def check_node_data(config: "Config") -> None:
    """What a server without client data must be told (``flower.node_data``): where the data is
    (each SuperNode's own file, so a deployment), the task and, for classification, the label set.
    Whether the model's tokenizer is fixed is checked where the model registry is at hand (the
    ServerApp refuses models that train theirs on the data)."""
    data = config.data
    if config.flower.mode != "deployment":
        raise ConfigError(
            "flower.node_data needs flower.mode: deployment (each SuperNode reads the file named in its node config)",
            "set flower.mode: deployment, or drop flower.node_data to partition data.source",
        )
    if data.task == "auto":
        raise ConfigError(
            "with flower.node_data the server sees no client data to guess the task from",
            "set data.task (classification, sft, math or completion)",
        )
    if data.task == "classification" and not data.labels:
        raise ConfigError(
            "with flower.node_data the label set must be fixed in the config (the server never sees the clients' labels)",
            "set data.labels to every label, in class-id order",
        )
    if data.max_examples is not None:
        raise ConfigError(
            "data.max_examples takes a subset of one pooled source; with flower.node_data each node uses its whole file",
            "drop data.max_examples",
        )
    if data.validation_size:
        raise ConfigError(
            "data.validation_size draws a validation set from one pooled source; with flower.node_data no one holds the pool",
            "drop data.validation_size (the server's own set is data.test_source)",
        )


def _sampled(config: "Config") -> int:
    import math

    return max(1, int(math.ceil(config.federation.sample_rate * config.federation.clients - 1e-9)))
