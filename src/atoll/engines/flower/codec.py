"""Adapter states and tensor dicts <-> Flower records.

A download or upload travels as one ArrayRecord of the trainable tensors (``lora.<m>.A``,
``lora.<m>.B``, ``extra.<n>``, ``base.<n>``, the keys of :meth:`AdapterState.to_tensors`) plus the
LoRA scales as plain numbers in the message's ConfigRecord. Scales stay out of the ArrayRecord on
purpose: Flower's DP wrappers add noise to every array they aggregate and SecAgg+ sums them, and a
scale must do neither. bfloat16 tensors (which ArrayRecord rejects) travel as float32 under a key
ending in ``::bf16`` and are cast back exactly.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import Tensor

from atoll.errors import UpdateError
from atoll.fl.state import AdapterState

BF16_SUFFIX = "::bf16"
SCALE_PREFIX = "atoll.scale."


def tensors_to_arrays(tensors: dict[str, Tensor]):
    """``{key: tensor}`` -> ArrayRecord (key order kept; bf16 as float32 under ``key::bf16``)."""
    from flwr.app import Array, ArrayRecord

    arrays = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            arrays[key + BF16_SUFFIX] = Array(tensor.float().contiguous())
        else:
            arrays[key] = Array(tensor.contiguous())
    return ArrayRecord(arrays)


def arrays_to_tensors(record) -> dict[str, Tensor]:
    """ArrayRecord (or ``{key: Array}``) -> ``{key: tensor}``, undoing the bf16 encoding."""
    tensors: dict[str, Tensor] = {}
    for key, array in record.items():
        tensor = torch.from_numpy(np.array(array.numpy(), copy=True))
        if key.endswith(BF16_SUFFIX):
            tensors[key[: -len(BF16_SUFFIX)]] = tensor.to(torch.bfloat16)
        else:
            tensors[key] = tensor
    return tensors


def split_state(state: AdapterState) -> tuple[dict[str, Tensor], dict[str, float]]:
    """An adapter state as (trainable tensors in ``to_tensors`` order, scales by module)."""
    tensors = {key: t for key, t in state.to_tensors().items() if not (key.startswith("lora.") and key.endswith(".s"))}
    scales = {name: float(factors.scale) for name, factors in state.lora.items()}
    return tensors, scales


def join_state(tensors: dict[str, Tensor], scales: dict[str, float]) -> AdapterState:
    """Inverse of :func:`split_state` (raises UpdateError on a module without its scale)."""
    full = dict(tensors)
    modules = {key[len("lora.") : -2] for key in tensors if key.startswith("lora.") and key[-2:] in (".A", ".B")}
    for name in modules:
        if name not in scales:
            raise UpdateError(f"module '{name}' arrived without its LoRA scale")
        full[f"lora.{name}.s"] = torch.tensor(float(scales[name]), dtype=torch.float64)
    return AdapterState.from_tensors(full)


def scales_to_config(scales: dict[str, float]) -> dict[str, float]:
    return {SCALE_PREFIX + name: float(value) for name, value in scales.items()}


def scales_from_config(config) -> dict[str, float]:
    return {key[len(SCALE_PREFIX) :]: float(value) for key, value in config.items() if key.startswith(SCALE_PREFIX)}


def state_to_records(state: AdapterState) -> tuple[Any, dict[str, float]]:
    """(ArrayRecord, ConfigRecord entries) carrying ``state``."""
    tensors, scales = split_state(state)
    return tensors_to_arrays(tensors), scales_to_config(scales)


def state_from_records(arrays, config) -> AdapterState:
    return join_state(arrays_to_tensors(arrays), scales_from_config(config))


def ordered_like(tensors: dict[str, Tensor], reference_keys: list[str]) -> dict[str, Tensor]:
    """``tensors`` re-ordered to ``reference_keys`` when both hold the same keys (Flower's
    clipping mods pair arrays by position); otherwise unchanged."""
    if set(tensors) == set(reference_keys):
        return {key: tensors[key] for key in reference_keys}
    return tensors


# -- legacy (SecAgg+) ----------------------------------------------------------------------------
# Flower's SecAgg+ exists only in the legacy API, whose parameters are an ordered list of arrays
# without names: the names, scales and dtypes travel as one JSON string next to them.


def state_to_legacy(state: AdapterState) -> tuple[list[np.ndarray], str]:
    """(ordered float arrays, JSON description) for a legacy FitIns/FitRes."""
    tensors, scales = split_state(state)
    keys = list(tensors)
    dtypes = {key: str(t.dtype).replace("torch.", "") for key, t in tensors.items()}
    arrays = [
        tensors[key].detach().cpu().float().numpy() if tensors[key].dtype == torch.bfloat16 else tensors[key].detach().cpu().numpy()
        for key in keys
    ]
    return arrays, json.dumps({"keys": keys, "scales": scales, "dtypes": dtypes}, separators=(",", ":"))


def state_from_legacy(arrays: list[np.ndarray], description: str) -> AdapterState:
    meta = json.loads(description)
    keys = meta["keys"]
    if len(keys) != len(arrays):
        raise UpdateError(f"a secure-aggregation message names {len(keys)} tensors but carries {len(arrays)}")
    tensors = {}
    for key, array in zip(keys, arrays):
        dtype = getattr(torch, meta["dtypes"].get(key, "float32"))
        tensors[key] = torch.from_numpy(np.array(array, copy=True)).to(dtype)
    return join_state(tensors, {name: float(value) for name, value in meta["scales"].items()})
