"""What tests need beyond the public entry points, in one place.

The federation is being reshaped (one federation object, three drivers). Tests that compare
engines or reproduce a run from its directory go through the CLI, ``start_run``, ``load_config``
and the run directory; where they need an internal (the algorithm registry and its declared
capabilities, the seeded test splits, a client's learning rate, the adapter a round should produce,
the Flower ClientApp's process cache, the math task's evaluation), they call a function here, so a
reshaping adapts this file and nothing else. Also here: reading run directories, reference runs
shared across tests and xdist workers, and killed-run copies for resume tests.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# keys of a metrics.jsonl record that measure the machine running the test, not the run
TIMING_KEYS = ("seconds", "wall_seconds")
# what every engine writes for a round: the task metrics, traffic and who trained
TASK_KEYS = ("round", "clients", "train", "global", "local", "bytes_up", "bytes_down")


def read_records(run_dir: Path, drop: tuple[str, ...] = TIMING_KEYS) -> list[dict[str, Any]]:
    """Every metrics.jsonl record of ``run_dir`` with the keys in ``drop`` removed."""
    records = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in drop:
            record.pop(key, None)
        records.append(record)
    return records


def task_view(record: dict[str, Any]) -> dict[str, Any]:
    """The part of a record every engine must agree on (no engine-specific keys)."""
    return {key: record[key] for key in TASK_KEYS if key in record}


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def assert_same_length(first: list, second: list, what: str = "lists") -> None:
    """Compare lengths before a pairwise loop: a zip would silently drop the longer tail."""
    assert len(first) == len(second), f"{what}: {len(first)} vs {len(second)} items"


# -- the registry ------------------------------------------------------------------------------------


def algorithm_names() -> list[str]:
    """Every registered algorithm, sorted (read at collection time, so new ones are covered)."""
    from atoll.algorithms import available

    return sorted(available())


def algorithm_class(name: str):
    from atoll.algorithms import get_algorithm

    return get_algorithm(name)


# -- the data a run directory does not hold ------------------------------------------------------------


@dataclass
class Examples:
    """Raw texts and their class ids (classification)."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]


@functools.lru_cache(maxsize=8)
def _data_of(config_yaml: str):
    """(raw columns, task spec, splits) of a resolved config, loaded once per config."""
    import yaml

    from atoll.config import build_config
    from atoll.experiment import load_data

    raw, spec, _, _, splits = load_data(build_config(yaml.safe_load(config_yaml)))
    return raw, spec, splits


def _examples(config, pick) -> Examples:
    raw, spec, splits = _data_of(config.to_yaml())
    index = {name: i for i, name in enumerate(spec.label_names)}
    rows = [int(i) for i in pick(splits)]
    texts = [str(raw.columns[spec.text_column][i]) for i in rows]
    labels = [index[str(raw.columns[spec.label_column][i])] for i in rows]
    return Examples(texts, labels, list(spec.label_names))


def task_kind(config) -> str:
    """The task the run's data is read as (classification, sft, math or completion)."""
    return _data_of(config.to_yaml())[1].kind


def global_test_examples(config) -> Examples:
    """The run's global test split (the seeded split the run evaluated ``final_global`` on)."""
    return _examples(config, lambda splits: splits.global_test)


def local_test_examples(config, client_id: int) -> Examples:
    """Client ``client_id``'s local test split."""
    return _examples(config, lambda splits: splits.client_test[client_id])


# -- reference runs shared across tests (and across xdist workers) ---------------------------------------


def shared_temp_dir(tmp_path_factory, name: str) -> Path:
    """A directory under this session's pytest temp root that every xdist worker sees."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    path = base / name
    path.mkdir(parents=True, exist_ok=True)
    return path


class ReferenceRuns:
    """Local-engine runs of tiny configs, each made once per test session and then shared.

    ``get(**overrides)`` returns the run directory of ``tiny_overrides(**overrides)`` on the local
    engine, running it the first time any worker asks (a file lock keeps two workers from running
    the same config). Treat the directory as read-only: copy it before changing anything.
    """

    def __init__(self, root: Path):
        self.root = root

    def get(self, **overrides) -> Path:
        from atoll.config import config_with
        from atoll.report.progress import Progress
        from atoll.dispatch import start_run
        from conftest import tiny_overrides

        key = hashlib.sha256(json.dumps(sorted((k, str(v)) for k, v in overrides.items())).encode()).hexdigest()[:16]
        path = self.root / key
        with open(self.root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "summary.json").is_file():
                shutil.rmtree(path, ignore_errors=True)
                values = {"run.plots": "false", **overrides, "run.dir": str(path)}
                start_run(config_with(tiny_overrides(self.root / "roots", **values)), Progress())
        return path

    def copy(self, destination: Path, **overrides) -> Path:
        """A private copy of the reference run of ``overrides`` at ``destination``."""
        shutil.copytree(self.get(**overrides), destination)
        return destination


def mixes_ranks(name: str) -> bool:
    """Whether the algorithm aggregates clients of different LoRA ranks (natively or by padding)."""
    return algorithm_class(name).capabilities.mixed_ranks in ("native", "pad")


def algorithm_case(name: str, model_dir: Path) -> dict[str, Any]:
    """The per-algorithm run the engine comparisons and the run-directory tests share: 2 rounds of
    2 local steps, 3 of 4 clients sampled, final local evaluation, client 1 at rank 4 where ranks
    may mix, on a plain Hugging Face model directory."""
    case = {
        "model.name": str(model_dir),
        "algorithm.name": name,
        "eval.local": "final",
        "federation.rounds": 2,
        "federation.sample_rate": 0.75,
        "train.local_steps": 2,
    }
    if mixes_ranks(name):
        case["model.lora.client_ranks"] = "{1: 4}"
    case.update(CASE_PARAMS.get(name, {}))
    return case


# FedMomentum merges into the base only the components beyond rank r up to energy tau; with tau = 1
# every component is kept, so the tiny run writes a base delta
CASE_PARAMS = {"fedmomentum": {"algorithm.energy": 1.0}}


# -- what one round should produce, computed in process ---------------------------------------------------


@dataclass
class ClippedRound:
    """Round 1 of a run under client- or server-side fixed clipping without noise, computed here:
    each sampled client's update norm before clipping, and the adapters before and after."""

    update_norms: list[float]
    initial_adapter: Path
    expected_adapter: Path


def clipped_round_one(config, clip: float, directory: Path) -> ClippedRound:
    """Train round 1's sampled clients from the global adapter as the engines do, clip each update
    (all of its tensors as one vector) to norm ``clip``, average them with equal weights, and write
    the initial and the resulting global adapter in PEFT format under ``directory``."""
    import torch

    from atoll.experiment import build
    from atoll.fl.state import AdapterState

    experiment = build(config)
    try:
        server = experiment.server
        start = server.global_state.clone()
        keys = [key for key in start.to_tensors() if not key.endswith(".s")]
        origin = start.to_tensors()
        total = {key: torch.zeros_like(origin[key], dtype=torch.float32) for key in keys}
        norms = []
        selected = server.sample(1, experiment.real_client_ids)
        for client_id in selected:
            uploaded = experiment.clients[client_id].run(1, server.configure(1, client_id)).state.to_tensors()
            assert [key for key in uploaded if not key.endswith(".s")] == keys, "the update carries other tensors than the global adapter"
            delta = {key: uploaded[key].float() - origin[key].float() for key in keys}
            norm = float(torch.sqrt(sum((d**2).sum() for d in delta.values())))
            norms.append(norm)
            for key in keys:
                total[key] += delta[key] * min(1.0, clip / norm) / len(selected)
        result = {**origin, **{key: (origin[key].float() + total[key]).to(origin[key].dtype) for key in keys}}
        initial, expected = directory / "initial", directory / "expected"
        experiment.workbench.save_peft(start, initial)
        experiment.workbench.save_peft(AdapterState.from_tensors(result), expected)
        return ClippedRound(norms, initial, expected)
    finally:
        experiment.close()


# -- the math task's scoring chain ---------------------------------------------------------------------------


@dataclass
class MathTask:
    spec: Any
    tokenizer: Any
    data: Any


def math_task(rows: list[dict[str, str]], directory: Path, max_length: int = 128) -> MathTask:
    """GSM8K-style rows {question, answer} as a local .jsonl source, read as the math task and
    tokenized with tiny-llama's byte-level BPE (trained offline on the rows)."""
    from atoll.config import DataConfig
    from atoll.data.sources import load_source
    from atoll.data.tasks import resolve_task, tokenize
    from atoll.models.registry import load_tokenizer

    path = directory / "math.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    raw = load_source(str(path))
    spec = resolve_task(DataConfig(source=str(path), task="math", prompt_column="question", response_column="answer"), raw)
    tokenizer = load_tokenizer("tiny-llama", lambda: spec.corpus(raw), directory)
    return MathTask(spec, tokenizer, tokenize(spec, raw, tokenizer, max_length, directory, "all"))


def evaluate_math(model, task: MathTask, batch_size: int, max_generate: int, max_new_tokens: int) -> dict[str, float]:
    """The run's evaluation of ``model`` on every example of ``task`` (answer loss, then greedy
    generation, answer extraction and exact match on the first ``max_generate``)."""
    import numpy as np

    from atoll.fl.trainer import evaluate_model

    indices = np.arange(len(task.data))
    return evaluate_model(
        model,
        task.spec,
        task.data,
        indices,
        int(task.tokenizer.pad_token_id),
        batch_size,
        tokenizer=task.tokenizer,
        max_generate=max_generate,
        max_new_tokens=max_new_tokens,
    )


def forget_flower_client_experiments() -> None:
    """Close and drop the experiment the in-process Flower ClientApp cached (as a fresh process has none)."""
    from atoll.engines.flower import client

    for experiment in client._EXPERIMENTS.values():
        experiment.close()
    client._EXPERIMENTS.clear()


def flower_dp_driver(experiment):
    """The Flower ServerApp's driver for the config of ``experiment``, built as the ServerApp builds
    it but with no runtime attached (its strategies and DP accountant can be driven by hand)."""
    from atoll.engines.flower.server import FlowerDriver
    from atoll.fl.federation import Federation

    return FlowerDriver(Federation(experiment), None, None, None)


def flower_dp_strategy(experiment):
    """What the Flower ServerApp trains with for the config of ``experiment``: (its strategy, wrapped
    in Flower's DP wrapper when flower.dp is on; the algorithm strategy inside it)."""
    driver = flower_dp_driver(experiment)
    return driver.strategy, driver.algorithm_strategy


def flower_secagg_workflow(config, max_weight: float = 100.0):
    """The SecAgg+ workflow the Flower ServerApp runs a round with, for ``config``."""
    from atoll.engines.flower.strategy import secagg_workflow

    return secagg_workflow(config.flower.secagg, max_weight, config.flower.round_timeout)


def aggregates_by_weighted_mean(name: str) -> bool:
    """Whether the algorithm's aggregate is the example-weighted mean of the uploads (what SecAgg+
    and central DP can stand in for)."""
    from atoll.algorithms import spec_of

    return spec_of(name).capabilities.weighted_mean


# -- resume ------------------------------------------------------------------------------------------------


def killed_copy(full_run: Path, stop_after: int, destination: Path) -> Path:
    """What a run killed right after round ``stop_after``'s checkpoint leaves, made from a finished
    run instead of running a second, interrupted one: the directory copied without the later
    checkpoints and without the final outputs. Its metrics.jsonl keeps the later rounds, as after a
    kill between a round's metrics and its checkpoint; resume must drop them."""
    shutil.copytree(full_run, destination)
    for checkpoint in (destination / "checkpoints").iterdir():
        if int(checkpoint.name.split("-", 1)[1]) > stop_after:
            shutil.rmtree(checkpoint)
    for name in ("summary.json", "metrics.png", "label_distribution.png"):
        (destination / name).unlink(missing_ok=True)
    for name in ("adapter", "personal"):
        shutil.rmtree(destination / name, ignore_errors=True)
    assert [path.name for path in sorted((destination / "checkpoints").iterdir())][-1] == f"round-{stop_after:05d}"
    return destination


def resume(run_dir: Path) -> dict[str, Any]:
    """Continue a killed run from its newest checkpoint (``atoll run --resume``); its summary."""
    from atoll.report.progress import Progress
    from atoll.dispatch import resume_run

    return resume_run(run_dir, Progress())[1]


def adapter_bytes(config, rank: int) -> int:
    """Bytes of a full adapter of ``rank`` as a transfer counts them (the seeded initial one)."""
    from atoll.experiment import build

    experiment = build(config)
    try:
        return experiment.workbench.initial_state(rank).nbytes()
    finally:
        experiment.close()


def client_split_sizes(config) -> list[tuple[int, int]]:
    """(train, local test) example counts of every client, as the run splits them."""
    _, _, splits = _data_of(config.to_yaml())
    return [(len(train), len(test)) for train, test in zip(splits.client_train, splits.client_test, strict=True)]


def client_labels(config) -> list[set[str]]:
    """The classes in each client's data (its train and local test examples together)."""
    raw, spec, splits = _data_of(config.to_yaml())
    column = raw.columns[spec.label_column]
    return [
        {str(column[int(i)]) for part in (train, test) for i in part}
        for train, test in zip(splits.client_train, splits.client_test, strict=True)
    ]


def client_learning_rate(config, client_id: int, round: int) -> float:
    """The peak learning rate client ``client_id`` trains with in ``round``."""
    from atoll.experiment import build

    experiment = build(config)
    try:
        return float(experiment.clients[client_id].plan(round).lr)
    finally:
        experiment.close()


def threads_while_building(config) -> int:
    """torch's CPU thread count right after building the run of ``config`` (then set back)."""
    import torch

    from atoll.experiment import build

    before = torch.get_num_threads()
    experiment = build(config)
    try:
        return torch.get_num_threads()
    finally:
        experiment.close()
        torch.set_num_threads(before)


def lora_scales(config) -> dict[int, float]:
    """The LoRA scale of each client rank the run uses, as the live PEFT adapters hold it."""
    from atoll.experiment import build

    experiment = build(config)
    try:
        ranks = sorted({config.rank_of(c) for c in range(config.federation.clients)})
        return {rank: next(iter(experiment.workbench.initial_state(rank).lora.values())).scale for rank in ranks}
    finally:
        experiment.close()


# -- the server's text reconstruction from one individual upload ----------------------------------------------

# tiny-llama on synthetic instructions, client 0 takes SGD steps on single 16-token sequences: the
# case in which the DAGER-style span test rebuilds a client's text from its plain upload
RECONSTRUCTION_CASE = {
    "model.name": "tiny-llama",
    "data.source": "synthetic-sft",
    "data.max_examples": 200,
    "partition.name": "iid",
    "model.max_length": 16,
    "model.lora.rank": 32,
    "federation.rounds": 1,
    "train.batch_size": 1,
    "train.optimizer": "sgd",
    "train.lr": 0.1,
    "eval.max_examples": 16,
    "attack.reconstruction.enabled": "true",
}
