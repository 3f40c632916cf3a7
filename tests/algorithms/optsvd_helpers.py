"""Random adapter states, pure-math servers/clients and tiny end-to-end runs for the tests of
fedprox, scaffold, fedavgm, fedadam, fedyogi, fedadagrad, fedsvd, ilora, fedmomentum, fedrot-lora."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from atoll.algorithms import get_algorithm
from atoll.config import config_with
from atoll.fl.base import ClientContext, ServerContext
from atoll.fl.state import AdapterState, LoRAFactors, Update
from atoll.fl.store import ClientStore
from atoll.report.progress import Progress
from atoll.report.rundir import RunDir
from atoll.dispatch import start_run
from conftest import tiny_overrides

MODULES = ("q", "v")
D, K = 10, 7  # out x in, not square: a transposed factor cannot pass
RANK = 3
SCALE = 16.0 / RANK
SIZES = [10, 25, 5, 60]  # unequal client weights


def random_state(seed: int, rank: int = RANK, scale: float = SCALE, zero_B: bool = False) -> AdapterState:
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name in MODULES:
        A = torch.randn(rank, K, generator=gen) / math.sqrt(K)
        B = torch.zeros(D, rank) if zero_B else torch.randn(D, rank, generator=gen)
        lora[name] = LoRAFactors(A, B, scale)
    extra = {"head.weight": torch.randn(3, D, generator=gen), "head.bias": torch.randn(3, generator=gen)}
    return AdapterState(lora, extra)


def initial_state(rank: int = RANK) -> AdapterState:
    return random_state(1000 + rank, rank, 16.0 / rank, zero_B=True)


def base_weights(seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(D, K, generator=gen) for name in MODULES}


def make_server(name: str, sizes: list[int] = SIZES, initial=None, base_weight=None, **params):
    config = config_with([f"federation.clients={len(sizes)}", f"model.lora.rank={RANK}", f"algorithm.name={name}"])
    start = initial if initial is not None else initial_state(RANK)
    context = ServerContext(config, list(sizes), [RANK] * len(sizes), lambda rank: start.clone(), base_weight=base_weight)
    cls = get_algorithm(name)
    return cls(context, cls.Params(**params))


def make_client(name: str, client_id: int = 0, store: ClientStore | None = None, overrides: list[str] = (), **params):
    """A client without a workbench (for compose/keep/upload math)."""
    config = config_with(["federation.clients=4", f"model.lora.rank={RANK}", f"algorithm.name={name}", *overrides])
    cls = get_algorithm(name)
    context = ClientContext(client_id, np.arange(40), np.arange(2), RANK, config, None, store if store is not None else ClientStore())
    return cls.client_class(context, cls.Params(**params))


def updates_for(states: list[AdapterState], sizes: list[int] = SIZES, ids=None) -> list[Update]:
    ids = list(range(len(states))) if ids is None else ids
    return [Update(i, n, s) for i, s, n in zip(ids, states, sizes, strict=True)]


def weights_of(sizes: list[int] = SIZES) -> list[float]:
    return [n / sum(sizes) for n in sizes]


def ideal_delta(states: list[AdapterState], name: str, sizes: list[int] = SIZES) -> torch.Tensor:
    """sum_k p_k s_k B_k A_k (float64)."""
    return sum(
        w * s.lora[name].scale * (s.lora[name].B.double() @ s.lora[name].A.double()) for w, s in zip(weights_of(sizes), states, strict=True)
    )


# -- end-to-end ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_plots(monkeypatch):
    """Skip the PNG plots of end-to-end runs (a third of a tiny run's time; nothing here reads them).
    Import this fixture into a test module to apply it there."""
    from atoll.report import plots

    monkeypatch.setattr(plots, "plot_metrics", lambda *args, **kwargs: None)
    monkeypatch.setattr(plots, "plot_label_distribution", lambda *args, **kwargs: None)


def run(tmp_path: Path, name: str, progress: Progress | None = None, **extra):
    """A tiny prototype run of algorithm ``name``; returns (run directory path, summary)."""
    overrides = tiny_overrides(tmp_path, **{"algorithm.name": name, **extra})
    run_dir, summary = start_run(config_with(overrides), progress or Progress())
    return run_dir.path, summary


def task_metrics(path: Path) -> list[dict]:
    """Every round's metrics from metrics.jsonl, timings removed."""
    records = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("seconds", None)
        record.pop("wall_seconds", None)
        records.append(record)
    return records


def assert_finite_run(path: Path, summary: dict) -> None:
    records = task_metrics(path)
    assert [r["round"] for r in records] == list(range(len(records)))
    final = summary["final_global"] or summary["final_local"]
    assert final and all(math.isfinite(v) for v in final.values() if isinstance(v, float))
    assert all(math.isfinite(r["train"]["loss"]) for r in records[1:])


def last_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """(server state_dict, {client_id: stored tensors}) of the newest checkpoint."""
    run_dir = RunDir(path)
    tensors, clients_dir, _ = run_dir.load_checkpoint(run_dir.checkpoint_rounds()[-1])
    clients = {}
    if clients_dir is not None and Path(clients_dir).is_dir():
        for file in sorted(Path(clients_dir).glob("client-*.safetensors")):
            clients[int(file.stem.split("-", 1)[1])] = load_file(str(file))
    return tensors, clients


class StopAfter(Progress):
    """Simulates a kill right after the checkpoint of round ``n``."""

    def __init__(self, n: int):
        self.n = n

    def round_end(self, round, record):
        if round == self.n:
            raise KeyboardInterrupt


# -- server optimisers ---------------------------------------------------------------------------


def optimised(state: AdapterState) -> dict[str, torch.Tensor]:
    """The tensors a server optimiser moves (A, B, heads), keyed like ``to_tensors``."""
    from atoll.algorithms._fedopt import optimised_keys

    tensors = state.to_tensors()
    return {k: tensors[k].float() for k in optimised_keys(state)}


def pseudo_gradient(x: AdapterState, states: list[AdapterState], sizes: list[int] = SIZES) -> dict[str, torch.Tensor]:
    """Delta = sum_k p_k x_k - x per tensor."""
    current = optimised(x)
    return {k: sum(w * optimised(s)[k] for w, s in zip(weights_of(sizes), states, strict=True)) - v for k, v in current.items()}
