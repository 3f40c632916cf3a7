"""Aggregation algorithms, one module each, registered by name.

``get_algorithm(name)`` returns the server class; its ``client_class``, ``Params`` and support
flags (``rank_support``, ``supports_async``, ``personalized``) describe the rest.
"""

from __future__ import annotations

import importlib
import pkgutil

from pydantic import ValidationError

from atoll.errors import ConfigError

_REGISTRY: dict[str, type] = {}
_LOADED = False


def register(cls: type) -> type:
    """Class decorator: make a BaseServer subclass available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"algorithm name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    _LOADED = True


def available() -> dict[str, type]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get_algorithm(name: str) -> type:
    algorithms = available()
    if name not in algorithms:
        raise ConfigError(f"unknown algorithm '{name}'", f"choose one of: {', '.join(algorithms)}")
    return algorithms[name]


def parse_params(server_cls: type, params: dict):
    try:
        return server_cls.Params(**params)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            allowed = ", ".join(server_cls.Params.model_fields) or "none"
            raise ConfigError(f"unknown key 'algorithm.{key}' for {server_cls.name}; allowed: {allowed}") from None
        raise ConfigError(f"algorithm.{key}: {first['msg']} (got {first.get('input')!r})") from None


def validate_params(config) -> None:
    """Check the algorithm name, its parameters and what it supports against the config."""
    server_cls = get_algorithm(config.algorithm.name)
    parse_params(server_cls, config.algorithm.params())
    ranks = {config.rank_of(c) for c in range(config.federation.clients)}
    if len(ranks) > 1 and server_cls.rank_support == "refuse":
        raise ConfigError(
            f"algorithm '{server_cls.name}' cannot aggregate different LoRA ranks {sorted(ranks)}",
            "give every client the same rank (model.lora.client_ranks) or use flora, flexlora or hetlora",
        )
    if config.run.export_personal:
        if not server_cls.exports_personal():
            exporting = ", ".join(name for name, cls in available().items() if cls.exports_personal())
            raise ConfigError(
                f"run.export_personal: algorithm '{server_cls.name}' has no personal model that is one LoRA adapter",
                f"drop run.export_personal or use one of: {exporting}",
            )
        if config.engine != "local" or config.realistic.dry_run:
            where = "engine: flower keeps personal state on the nodes" if config.engine != "local" else "a dry run trains nothing"
            raise ConfigError(f"run.export_personal needs the local engine with training ({where})", "drop run.export_personal")
