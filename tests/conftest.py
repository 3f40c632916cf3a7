"""Shared fixtures: offline, one thread, a private cache, and small configs that run in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("atoll-cache")
    os.environ["ATOLL_CACHE"] = str(cache)
    yield cache


def tiny_overrides(root, **extra) -> list[str]:
    """A federation of 4 clients on the synthetic topic task with a random-init tiny BERT."""
    values = {
        "model.name": "tiny-bert",
        "data.source": "synthetic-cls",
        "data.max_examples": 600,
        "federation.clients": 4,
        "federation.rounds": 2,
        "train.local_steps": 4,
        "train.batch_size": 16,
        "train.lr": 0.005,
        "eval.batch_size": 128,
        "run.root": str(root),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def tiny_config(tmp_path):
    from atoll.config import config_with

    def make(**extra):
        return config_with(tiny_overrides(tmp_path / "runs", **extra))

    return make


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """Local-engine runs of tiny configs made once per session and shared (see helpers.ReferenceRuns)."""
    from helpers import ReferenceRuns, shared_temp_dir

    return ReferenceRuns(shared_temp_dir(tmp_path_factory, "reference-runs"))
