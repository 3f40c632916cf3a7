"""Aggregation algorithms, one module each, declared in :mod:`atoll.algorithms.catalog`.

``get_algorithm(name)`` imports the one module that implements ``name`` and returns its server
class (whose ``client_class`` is the client side); ``specs()`` lists every declaration without
importing any algorithm module, so listing and config checks stay cheap and a broken module breaks
only the runs that choose it.
"""

from __future__ import annotations

import importlib

from pydantic import ValidationError

from atoll.algorithms.catalog import SPECS
from atoll.fl.capabilities import AlgorithmSpec
from atoll.errors import ConfigError


def specs() -> dict[str, AlgorithmSpec]:
    """Every algorithm's declaration, by name (sorted; nothing is imported)."""
    return dict(sorted(SPECS.items()))


def spec_of(name: str) -> AlgorithmSpec:
    """The declaration of ``name`` (ConfigError naming the choices when unknown)."""
    if name not in SPECS:
        close = [known for known in SPECS if known.replace("-", "") == name.lower().replace("-", "").replace("_", "")]
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown algorithm '{name}'{hint}", f"choose one of: {', '.join(sorted(SPECS))}")
    return SPECS[name]


def get_algorithm(name: str) -> type:
    """The server class of ``name``; imports its module only."""
    spec = spec_of(name)
    module = importlib.import_module(f"{__name__}.{spec.module}")
    return getattr(module, spec.server_class)


def available() -> dict[str, type]:
    """Every algorithm's server class, by name (imports every algorithm module: tests and tools)."""
    return {name: get_algorithm(name) for name in specs()}


def parse_params(spec_or_class, params: dict):
    """The algorithm's parameters validated by its Params model (ConfigError on a bad key/value)."""
    spec = spec_or_class if isinstance(spec_or_class, AlgorithmSpec) else spec_or_class.spec
    try:
        return spec.Params(**params)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            allowed = ", ".join(spec.Params.model_fields) or "none"
            raise ConfigError(f"unknown key 'algorithm.{key}' for {spec.name}; allowed: {allowed}") from None
        raise ConfigError(f"algorithm.{key}: {first['msg']} (got {first.get('input')!r})") from None
