"""Flower deployment where data never moves: each SuperNode reads only its own file.

With ``flower.node_data: true`` every SuperNode is started with ``data-file=PATH`` in its node
config (``atoll flower supernode --data-file PATH``) and builds its client from that file alone:
the task and the label set come from the run config (``data.task``, ``data.labels``), the
tokenizer from the model, and the node's train/test split from ``data.local_test_fraction``,
drawn exactly as the local engine splits a client's partition. The ServerApp opens no client
file: its global test set is ``data.test_source`` (a file on the server's machine) or nothing,
and each client's example counts arrive in its node's answer to the partition query.

A local run over the same files, concatenated with a column naming each row's file and split
by ``partition: {name: natural, column: that column}`` with the same ``data.test_source``, trains
the same clients on the same examples in the same order (tests/flower/test_node_data.py).
The server's side (its test set, its federation) is :mod:`.server_data`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from atoll.errors import AtollError, ConfigError, DataError

if TYPE_CHECKING:
    from atoll.config import Config
    from atoll.data.sources import RawData
    from atoll.data.tasks import TaskSpec
    from atoll.experiment import LoadedData

DATA_FILE_KEY = "data-file"
TRAIN_KEY, TEST_KEY, PROBLEM_KEY = "train-examples", "test-examples", "problem"


def node_data_file(node_config) -> Path:
    """The node's own data file, named by ``data-file`` in its node config."""
    value = node_config.get(DATA_FILE_KEY) if node_config is not None else None
    if not value:
        raise ConfigError(
            f"this run reads each node's own data (flower.node_data) but the SuperNode's node config has no '{DATA_FILE_KEY}'",
            "start it with `atoll flower supernode ... --data-file PATH`",
        )
    return Path(str(value)).expanduser().absolute()


def read_node_file(config: "Config", path: Path) -> tuple["RawData", "TaskSpec"]:
    """The node's rows and the task they serve (columns from the config or the file's defaults;
    labels must lie in ``data.labels``)."""
    from atoll.data.sources import load_local_file
    from atoll.data.tasks import resolve_task

    raw = load_local_file(path)
    return raw, resolve_task(config.data, raw)


def client_split(config: "Config", client_id: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row numbers of a node's file: :func:`atoll.data.partition.split_local` with the
    local engine's seed stream for this client, so a local run over the same rows splits alike."""
    from atoll.data.partition import split_local
    from atoll.seeding import numpy_rng

    minimum = config.partition.min_examples
    if rows < minimum:
        raise DataError(f"the node's file holds {rows} examples, fewer than partition.min_examples={minimum}", "give it more rows")
    return split_local(np.arange(rows), config.data.local_test_fraction, numpy_rng(config.seed, "local-split", client_id))


def query_entries(run_config, node_config) -> dict[str, Any]:
    """What a node adds to its query reply in a node-data run: its train and test example counts,
    or the problem that keeps it from serving. Reads the file's rows only (no tokenizer, no torch)."""
    from atoll.engines.flower import protocol

    try:
        run, _ = protocol.read_run_config(run_config)
        if not run.config.flower.node_data:
            return {}
        config = run.config
        client_id = int(node_config.get("partition-id", -1))
        raw, _ = read_node_file(config, node_data_file(node_config))
        train, test = client_split(config, client_id, len(raw))
        return {TRAIN_KEY: int(len(train)), TEST_KEY: int(len(test))}
    except AtollError as error:
        return {PROBLEM_KEY: str(error)}


def _check_fixed_tokenizer(config: "Config") -> None:
    from atoll.models.registry import tokenizer_from_data

    if tokenizer_from_data(config.model.name):
        raise ConfigError(
            f"model '{config.model.name}' trains its tokenizer on the data, which flower.node_data keeps on the nodes",
            "use a model with its own tokenizer (tiny-bert, minilm, atoll-tiny, atoll-edge, atoll-cloud or a local directory)",
        )


def fixed_tokenizer(config: "Config"):
    """The model's own tokenizer (refused for models that train theirs on the data) and the cache directory."""
    from atoll.data.tasks import default_cache_dir
    from atoll.models.registry import load_tokenizer

    _check_fixed_tokenizer(config)
    cache_dir = Path(config.data.cache_dir).expanduser() if config.data.cache_dir else default_cache_dir()

    def no_corpus() -> list[str]:  # never called: _check_fixed_tokenizer refused models that need one
        raise ConfigError("this model needs the data to build its tokenizer")

    return load_tokenizer(config.model.name, no_corpus, cache_dir), cache_dir


def empty_splits(config: "Config", global_test: np.ndarray):
    """Splits with ``global_test`` and no client rows (a node fills in its own client's)."""
    from atoll.experiment import Splits

    empty = np.array([], dtype=np.int64)
    clients = config.federation.clients
    return Splits(global_test, [empty] * clients, [empty] * clients, None)


def load_node_data(config: "Config", client_id: int, path: Path) -> "LoadedData":
    """A node's data: its own file tokenised, its client's train/test split, nothing else (no
    global test set, no other client)."""
    from atoll.data.tasks import tokenize
    from atoll.experiment import LoadedData
    from atoll.models.registry import check_model_for_task

    raw, spec = read_node_file(config, path)
    check_model_for_task(config.model.name, spec.is_generative)
    tokenizer, cache_dir = fixed_tokenizer(config)
    data = tokenize(spec, raw, tokenizer, config.model.max_length, cache_dir, "all")
    train, test = client_split(config, client_id, len(data))
    splits = empty_splits(config, np.array([], dtype=np.int64))
    splits.client_train[client_id], splits.client_test[client_id] = train, test
    return LoadedData(spec, tokenizer, data, splits)
