"""Random streams derived from (seed, purpose, client, round), never from execution order."""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that depends only on ``seed`` and ``keys`` (stable across processes)."""
    text = repr((int(seed),) + tuple(str(k) for k in keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def numpy_rng(seed: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys: object) -> torch.Generator:
    import torch  # not at module level: config checks and the event simulator use this module without torch

    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def seed_everything(seed: int, *keys: object) -> None:
    """Seed the global torch/numpy/random state for code we do not control (dropout, peft init)."""
    import torch

    value = derive_seed(seed, *keys)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % (2**32))
