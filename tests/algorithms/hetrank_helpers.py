"""Random adapter states and pure-math servers for the tests of ffa-lora, rolora, fedsa-lora,
flora, flexlora, hetlora and fedex-lora (no model: every tensor is random)."""

from __future__ import annotations

import math

import pytest
import torch

from atoll.algorithms import get_algorithm
from atoll.config import config_with
from atoll.fl.base import ClientContext, ServerContext
from atoll.fl.state import AdapterState, LoRAFactors, Update
from atoll.fl.store import ClientStore

MODULES = ("q", "v")
D, K = 12, 9  # out_features x in_features: not square, so a transposed factor cannot pass
ALPHA = 16.0


def scale_of(rank: int) -> float:
    return ALPHA / rank


def random_state(seed: int, rank: int = 4, d: int = D, k: int = K, zero_B: bool = False) -> AdapterState:
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name in MODULES:
        A = torch.randn(rank, k, generator=gen) / math.sqrt(k)
        B = torch.zeros(d, rank) if zero_B else torch.randn(d, rank, generator=gen)
        lora[name] = LoRAFactors(A, B, scale_of(rank))
    extra = {"head.weight": torch.randn(3, d, generator=gen), "head.bias": torch.randn(3, generator=gen)}
    return AdapterState(lora, extra)


def initial_state(rank: int, d: int = D, k: int = K) -> AdapterState:
    """PEFT-like initial adapter of ``rank``: random A, zero B, a shared head."""
    state = random_state(1000 + rank, rank, d, k, zero_B=True)
    state.extra = random_state(999, 1, d, k).extra
    return state


def make_server(name: str, sizes: list[int], ranks: list[int], d: int = D, k: int = K, **params):
    """A server of algorithm ``name`` for clients of ``sizes`` and ``ranks`` (default rank = ranks[0])."""
    config = config_with([f"federation.clients={len(sizes)}", f"model.lora.rank={ranks[0]}", f"model.lora.alpha={ALPHA}"])
    context = ServerContext(config, list(sizes), list(ranks), lambda rank: initial_state(rank, d, k))
    cls = get_algorithm(name)
    return cls(context, cls.Params(**params))


def make_client(name: str, client_id: int = 0, rank: int = 4, **params):
    """A client without a workbench (for compose/upload math)."""
    config = config_with(["federation.clients=4", f"model.lora.rank={rank}"])
    cls = get_algorithm(name)
    context = ClientContext(client_id, torch.arange(10).numpy(), torch.arange(2).numpy(), rank, config, None, ClientStore())
    return cls.client_class(context, cls.Params(**params))


def updates_for(states: list[AdapterState], sizes: list[int]) -> list[Update]:
    return [Update(i, n, s) for i, (s, n) in enumerate(zip(states, sizes, strict=True))]


def weights_of(sizes: list[int]) -> list[float]:
    total = sum(sizes)
    return [n / total for n in sizes]


def assert_finite_summary(summary: dict) -> None:
    values = [v for part in ("final_global", "final_local") for v in summary[part].values() if isinstance(v, (int, float))]
    assert values, "the run reported no metrics"
    assert all(math.isfinite(v) for v in values), summary


def task_metrics(run_dir) -> list[dict]:
    """Every round's metrics from metrics.jsonl, timings removed."""
    import json

    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("seconds", None)
        record.pop("wall_seconds", None)
        records.append(record)
    return records


def assert_resume_reproduces_the_uninterrupted_run(tmp_path, overrides: dict, stop_after: int = 2, before_the_cut=None) -> list[dict]:
    """Resume a copy of a finished run cut back to the checkpoint of round ``stop_after`` and
    compare every round's metrics with the finished run. ``before_the_cut(records, config)``
    asserts what must have happened by then (so the resume carries it across the cut). Returns
    the finished run's records."""
    from atoll.report.progress import Progress
    from atoll.dispatch import start_run
    from conftest import tiny_overrides
    from helpers import killed_copy, resume

    config = config_with(
        tiny_overrides(tmp_path, **{"train.local_steps": 2, "data.max_examples": 400, **overrides}, **{"run.dir": str(tmp_path / "full")})
    )
    full, full_summary = start_run(config, Progress())
    records = task_metrics(full.path)
    if before_the_cut is not None:
        before_the_cut([r for r in records if r["round"] <= stop_after], config)
    resumed_summary = resume(killed_copy(full.path, stop_after, tmp_path / "cut"))
    assert task_metrics(tmp_path / "cut") == records
    assert resumed_summary["final_global"] == full_summary["final_global"]
    assert resumed_summary["final_local"] == full_summary["final_local"]
    return records


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """Skip the PNG plots of end-to-end runs (nothing in these tests reads them). Autouse in
    every module that imports it."""
    from atoll.report import plots

    monkeypatch.setattr(plots, "plot_metrics", lambda *args, **kwargs: None)
    monkeypatch.setattr(plots, "plot_label_distribution", lambda *args, **kwargs: None)
