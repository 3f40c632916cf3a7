"""The registries of defenses and attacks: a name -> "module:Class", imported only when used.

To add one: write the class (see :mod:`atoll.split.defenses.base` or
:mod:`atoll.split.attacks.base`), add a line here, and a test of what its paper says it does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from atoll.errors import ConfigError

if TYPE_CHECKING:
    from atoll.split.config import SplitConfig

DEFENSES: dict[str, str] = {
    "gaussian-noise": "atoll.split.defenses.gaussian:GaussianNoise",
    "laplace-dp": "atoll.split.defenses.dp:LaplaceDP",
    "gaussian-dp": "atoll.split.defenses.dp:GaussianDP",
    "dchi-privacy": "atoll.split.defenses.dchi:DChiPrivacy",
    "gradient-sparsification": "atoll.split.defenses.sparsification:GradientSparsification",
    "mid": "atoll.split.defenses.mid:MID",
    "adversarial-training": "atoll.split.defenses.adversarial:AdversarialTraining",
    "textobfuscator": "atoll.split.defenses.textobfuscator:TextObfuscator",
    "santext": "atoll.split.defenses.santext:SanText",
    "custext": "atoll.split.defenses.custext:CusText",
    "rantext": "atoll.split.defenses.rantext:RanText",
    "split-and-denoise": "atoll.split.defenses.split_and_denoise:SplitAndDenoise",
    "nopeek": "atoll.split.defenses.nopeek:NoPeek",
}

ATTACKS: dict[str, str] = {
    "white-box-inversion": "atoll.split.attacks.inversion:WhiteBoxInversion",
    "relaxation-inversion": "atoll.split.attacks.relaxation:RelaxationInversion",
    "bisr": "atoll.split.attacks.bisr:BiSR",
    "batch-label-inference": "atoll.split.attacks.label_inference:BatchLabelInference",
    "norm-scoring": "atoll.split.attacks.norm_scoring:NormScoring",
}

_REGISTRIES = {"defense": DEFENSES, "attack": ATTACKS}


def plugin_class(kind: str, name: str) -> Any:
    """The class registered as ``name`` ("defense" or "attack"); unknown names are ConfigErrors."""
    registry = _REGISTRIES[kind]
    if name not in registry:
        raise ConfigError(f"unknown {kind} '{name}'", f"choose one of: {', '.join(registry)}")
    module_name, _, class_name = registry[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def parse_plugin_params(kind: str, name: str, params: dict[str, Any], where: str) -> Any:
    cls = plugin_class(kind, name)
    try:
        return cls.Params.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            allowed = ", ".join(cls.Params.model_fields) or "none"
            raise ConfigError(f"{where}: unknown parameter '{key}' of {kind} '{name}'", f"allowed: {allowed}") from None
        raise ConfigError(f"{where}.{key}: {first['msg']} (got {first.get('input')!r})") from None


def check_plugins(config: "SplitConfig") -> None:
    """Every defense and attack named in ``config`` exists and its parameters are valid."""
    for index, item in enumerate(config.defenses):
        parse_plugin_params("defense", item.name, item.params(), f"defenses[{index}]")
    for index, item in enumerate(config.attacks):
        parse_plugin_params("attack", item.name, item.params(), f"attacks[{index}]")
