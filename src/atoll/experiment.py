"""Assemble a runnable federation from a config: data, partition, model, server and clients.

Everything that can fail because of user input (a missing file, an unknown name, a column that
does not exist, too many clients) fails here, before any run directory exists.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from atoll.algorithms import get_algorithm, parse_params
from atoll.config import Config
from atoll.data.partition import label_histogram, partition, split_local
from atoll.data.sources import RawData, load_source
from atoll.data.tasks import TaskSpec, Tokenized, check_source_fits, concat_tokenized, default_cache_dir, resolve_task, tokenize
from atoll.errors import DataError
from atoll.fl.capabilities import POOLED_CLIENT
from atoll.fl.base import BaseClient, BaseServer, ClientContext, ServerContext, local_steps
from atoll.fl.state import AdapterState
from atoll.fl.store import ClientStore
from atoll.fl.workbench import Workbench
from atoll.models.registry import (
    check_model_for_task,
    check_model_name,
    check_trainable_modules,
    load_base_model,
    load_tokenizer,
    target_modules,
)
from atoll.resolve import ResolvedRun, resolve
from atoll.seeding import numpy_rng


@dataclass
class Splits:
    """Indices into the tokenised pool: the global test set and each client's train/test split
    (``label_table``, clients x labels, is None where the clients' data is not here: a Flower
    node-data server)."""

    global_test: np.ndarray
    client_train: list[np.ndarray]
    client_test: list[np.ndarray]
    label_table: np.ndarray | None

    def client_sizes(self) -> list[int]:
        return [len(t) for t in self.client_train]


@dataclass
class Experiment:
    config: Config
    spec: TaskSpec
    data: Tokenized
    splits: Splits
    workbench: Workbench
    server: BaseServer
    clients: dict[int, BaseClient]
    store: ClientStore
    run: ResolvedRun | None = None
    setup_seconds: float = 0.0
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def real_client_ids(self) -> list[int]:
        return [c for c in self.clients if c >= 0]

    def majority_rate(self) -> float | None:
        """Share of the most frequent class in the global test set (classification only)."""
        return majority_rates(self.spec, self.data, self.splits)[0]

    def local_majority_rate(self) -> float | None:
        """What a constant predictor of each client's own majority class scores on the local test
        splits, weighted by their sizes as local evaluation weights them (classification only)."""
        return majority_rates(self.spec, self.data, self.splits)[1]

    def close(self) -> None:
        self.store.close()


def majority_rates(spec: TaskSpec, data: Tokenized, splits: Splits) -> tuple[float | None, float | None]:
    """(global, local) majority-class rates: the accuracy a constant predictor gets on the global
    test set, and with each client predicting its own test split's majority class."""
    if spec.kind != "classification":
        return None, None
    counts = np.bincount(data.labels[splits.global_test], minlength=spec.num_labels)
    local = [(len(t), np.bincount(data.labels[t], minlength=spec.num_labels).max()) for t in splits.client_test if len(t)]
    local_rate = float(sum(top for _, top in local) / sum(n for n, _ in local)) if local else None
    return float(counts.max() / counts.sum()), local_rate


def load_data(config: Config) -> tuple[RawData, TaskSpec, object, Tokenized, Splits]:
    """The data half of :func:`build`: source, task, tokenizer, tokenised pool and splits."""
    raw = load_source(config.data.source)
    spec = resolve_task(config.data, raw)
    check_model_for_task(config.model.name, spec.is_generative)
    raw, subset_key = _subset(raw, config.data.max_examples, split_seed(config))
    cache_dir = Path(config.data.cache_dir).expanduser() if config.data.cache_dir else default_cache_dir()
    tokenizer = load_tokenizer(config.model.name, lambda: spec.corpus(raw), cache_dir)
    data = tokenize(spec, raw, tokenizer, config.model.max_length, cache_dir, subset_key)
    test_rows = 0
    if config.data.test_source:  # the global test set is its own source, appended after the pool
        test_raw = load_source(config.data.test_source)
        check_source_fits(spec, test_raw, f"data.test_source '{config.data.test_source}'")
        test_data = tokenize(spec, test_raw, tokenizer, config.model.max_length, cache_dir, "all")
        data, test_rows = concat_tokenized(data, test_data), len(test_data)
    return raw, spec, tokenizer, data, make_splits(config, data, raw, spec, test_rows)


def _subset(raw: RawData, max_examples: int | None, seed: int) -> tuple[RawData, str]:
    if max_examples is None or max_examples >= len(raw):
        return raw, "all"
    keep = np.sort(numpy_rng(seed, "subset").choice(len(raw), size=max_examples, replace=False))
    columns = {name: [values[i] for i in keep] for name, values in raw.columns.items()}
    return RawData(columns, raw.task, raw.defaults, raw.fingerprint, raw.description), f"subset:{seed}:{max_examples}"


def split_seed(config: Config) -> int:
    """The seed of the data subset and the test/validation draw: ``data.split_seed``, else ``seed``."""
    return config.seed if config.data.split_seed is None else config.data.split_seed


def _held_out_count(size: float, n: int) -> int:
    return int(size) if size >= 1 else int(round(size * n))


def make_splits(config: Config, data: Tokenized, raw: RawData, spec: TaskSpec, test_rows: int = 0) -> Splits:
    """The global test set (the last ``test_rows`` examples when data.test_source gave them, else
    data.test_size of the pool at random), then the validation set (``data.validation_size``), then
    each client's train/test split of the rest. Global evaluation uses the test set, or with
    ``eval.on: validation`` the validation set, which no client trains on and no reported number uses."""
    n = len(data) - test_rows
    test_size, validation_size = config.data.test_size, config.data.validation_size
    test_count = 0 if test_rows else _held_out_count(test_size, n)
    validation_count = _held_out_count(validation_size, n)
    if (test_count < 1 and not test_rows) or test_count + validation_count >= n:
        raise DataError(
            f"data.test_size={test_size:g} and data.validation_size={validation_size:g} leave {max(n - test_count - validation_count, 0)}"
            f" of the {n} examples for training",
            "use fractions in (0, 1) or smaller counts",
        )
    order = numpy_rng(split_seed(config), "global-test").permutation(n)
    test = np.arange(n, len(data)) if test_rows else order[:test_count]
    held_out = order[test_count : test_count + validation_count] if config.eval.on == "validation" else test
    # eval.max_examples keeps a random subset (the first of a random order), not the lowest indices:
    # a source stored in order (Shakespeare, play by play) would otherwise be scored on one part of it;
    # a separate data.test_source is used in its own order
    global_test = np.sort(held_out[: config.eval.max_examples])
    pool = np.sort(order[test_count + validation_count :])
    column = config.partition.column
    column_values = None
    if column is not None:
        if column not in raw.columns:
            raise DataError(f"partition.column '{column}' does not exist", f"columns are: {', '.join(raw.columns)}")
        values = raw.columns[column]
        column_values = [values[i] for i in pool]
    labels = data.labels[pool]
    parts = partition(config.partition, config.federation.clients, labels, numpy_rng(config.seed, "partition"), column_values)
    client_train, client_test = [], []
    for client_id, part in enumerate(parts):
        train, test = split_local(pool[part], config.data.local_test_fraction, numpy_rng(config.seed, "local-split", client_id))
        client_train.append(train)
        client_test.append(test)
    table = label_histogram(labels, parts, spec.num_labels)
    return Splits(global_test, client_train, client_test, table)


@dataclass
class LoadedData:
    """What :func:`build` needs of the data: the task, the tokenizer, the tokenised examples and
    the splits (from :func:`load_data`, or prepared elsewhere: a Flower node's cache or its own file)."""

    spec: TaskSpec
    tokenizer: object
    data: Tokenized
    splits: Splits


def build(config: Config | ResolvedRun, store_dir: Path | None = None, loaded: LoadedData | None = None) -> Experiment:
    """Load data and model and create the server and clients of a resolved run (a config is
    resolved first: every check happens before anything is loaded). ``loaded`` replaces
    :func:`load_data` where the data were prepared elsewhere."""
    started = time.perf_counter()
    run = resolve(config)
    config = run.config
    torch.set_num_threads(config.run.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_model_name(config.model.name)
    server_cls = get_algorithm(config.algorithm.name)
    params = parse_params(run.spec, config.algorithm.params())

    if loaded is None:
        _, spec, tokenizer, data, splits = load_data(config)
    else:
        spec, tokenizer, data, splits = loaded.spec, loaded.tokenizer, loaded.data, loaded.splits
    model = load_base_model(
        config.model.name, spec.is_generative, spec.num_labels, tokenizer, config.model.dtype, config.seed, config.model.random_init
    )
    targets = target_modules(model, config.model.lora.target_modules)
    check_trainable_modules(model, config.model.lora.trainable_modules)
    workbench = Workbench(
        model,
        tokenizer,
        spec,
        data,
        config.model.lora,
        targets,
        config.seed,
        eval_batch_size=config.eval.batch_size,
        max_new_tokens=config.eval.max_new_tokens,
    )
    server_cls.prepare_workbench(workbench, config, params)
    store = ClientStore(int(config.run.store_budget_mb * 2**20), store_dir)
    max_generate = config.eval.max_generate

    def evaluator(state: AdapterState) -> dict[str, float]:
        workbench.load(state)
        return workbench.evaluate(splits.global_test, max_generate=max_generate)

    ranks = list(run.client_ranks)
    server = server_cls(
        ServerContext(config, splits.client_sizes(), ranks, workbench.initial_state, evaluator, base_weight=workbench.base.pristine), params
    )
    clients: dict[int, BaseClient] = {}
    for client_id in range(config.federation.clients):
        context = ClientContext(
            client_id, splits.client_train[client_id], splits.client_test[client_id], ranks[client_id], config, workbench, store
        )
        clients[client_id] = server_cls.client_class(context, params)
    if run.spec.capabilities.pooled_data:
        clients[POOLED_CLIENT] = _pooled_client(config, splits, workbench, store, server_cls, params)
    return Experiment(config, spec, data, splits, workbench, server, clients, store, run, time.perf_counter() - started)


def _pooled_client(config: Config, splits: Splits, workbench: Workbench, store: ClientStore, server_cls, params) -> BaseClient:
    """The centralized baseline's one client: all training data, as many steps per round as the
    sampled clients would take together."""
    pooled = np.sort(np.concatenate(splits.client_train))
    sampled = max(1, int(np.ceil(config.federation.sample_rate * config.federation.clients - 1e-9)))
    mean_size = int(np.mean(splits.client_sizes()))
    steps = sampled * local_steps(config.train, mean_size)
    pooled_config = config.model_copy(deep=True)
    pooled_config.train.local_steps = steps
    context = ClientContext(POOLED_CLIENT, pooled, np.array([], dtype=np.int64), config.model.lora.rank, pooled_config, workbench, store)
    return server_cls.client_class(context, params)
