"""A node's cache of prepared data, so a fresh ClientApp process does not rebuild it.

In deployment Flower starts a new ClientApp process for every message. Without this cache each
one would read the data source, load the tokenizer, look up the tokenised examples and partition
them again; with it, a process loads one ``.npz`` of token ids and split indices and a small JSON
(the task and the handful of tokenizer ids the model and the batches need). The tokenizer itself
is loaded only if something asks for more than those ids (generation during evaluation).

An entry is keyed by everything that decides the data: the ``data`` and ``partition`` sections,
the clients, the seed, the model's name and ``max_length``, ``eval.max_examples``, the node's own
file in a node-data run (and its client id there), and the identity (path, size, modification
time) of every local file or model directory involved. Built-in sources are keyed by name; hub
sources are not cached. Entries live under ``<atoll cache>/flower-node/`` (``data.cache_dir`` or
``$ATOLL_CACHE`` or ``~/.cache/atoll``), are written to a temporary name and renamed, and only
the newest :data:`KEEP_ENTRIES` are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

FORMAT = 1
KEEP_ENTRIES = 16
TOKENIZER_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


class CachedTokenizer:
    """The ids a run needs of its tokenizer (pad, bos, eos, vocabulary size) without loading it;
    anything else (decoding generated text) loads the real tokenizer on first use."""

    def __init__(self, ids: dict[str, Any], load: Callable[[], Any]):
        self.pad_token_id = ids.get("pad_token_id")
        self.bos_token_id = ids.get("bos_token_id")
        self.eos_token_id = ids.get("eos_token_id")
        self._length = int(ids["length"])
        self._load = load
        self._real = None

    def __len__(self) -> int:
        return self._length

    def real(self):
        if self._real is None:
            self._real = self._load()
        return self._real

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.real(), name)

    def __call__(self, *args, **kwargs):
        return self.real()(*args, **kwargs)


def tokenizer_ids(tokenizer) -> dict[str, Any]:
    ids = {name: getattr(tokenizer, name, None) for name in TOKENIZER_IDS}
    ids["length"] = len(tokenizer)
    return ids


def cache_root(config) -> Path:
    from atoll.data.tasks import default_cache_dir

    base = Path(config.data.cache_dir).expanduser() if config.data.cache_dir else default_cache_dir()
    return base / "flower-node"


def _identity(path: Path) -> list:
    """What changes when a file or a directory's files change (path, sizes, modification times)."""
    path = path.expanduser().resolve()
    if path.is_file():
        stat = path.stat()
        return [str(path), stat.st_size, stat.st_mtime_ns]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return [str(path), [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]]
    return [str(path), None]


def _source_identity(source: str | None) -> Any:
    """A built-in source by name, a local file by its identity; None for a hub name (not cached)."""
    from atoll.data.sources import BUILTIN_SOURCES, LOCAL_SUFFIXES

    if source is None or source in BUILTIN_SOURCES:
        return source
    path = Path(source).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        return _identity(path)
    return None


def entry_key(config, client_id: int, node_file: Path | None) -> str | None:
    """The cache key of this node's data, or None when it cannot be cached (a hub source)."""

    data = config.data
    parts: dict[str, Any] = {
        "format": FORMAT,
        "data": data.model_dump(mode="json"),
        "partition": config.partition.model_dump(mode="json"),
        "clients": config.federation.clients,
        "seed": config.seed,
        "model": config.model.name,
        "max_length": config.model.max_length,
        "eval_max_examples": config.eval.max_examples,
    }
    if node_file is not None:
        parts["node_file"], parts["client"] = _identity(node_file), client_id
    else:
        parts["source"] = _source_identity(data.source)
        if parts["source"] is None:
            return None
        if data.source == "shakespeare":
            from atoll.data import shakespeare

            parts["archive"] = shakespeare.archive_fingerprint()
    if data.test_source is not None:
        parts["test_source"] = _source_identity(data.test_source)
        if parts["test_source"] is None:
            return None
    model = Path(config.model.name).expanduser()
    if model.is_dir():
        parts["model_dir"] = _identity(model)
    text = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def save(directory: Path, loaded) -> None:
    """Write ``loaded`` (an :class:`~atoll.experiment.LoadedData`) as a cache entry, atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        data, splits = loaded.data, loaded.splits
        arrays = {
            "ids": data.ids,
            "offsets": data.offsets,
            "labels": data.labels,
            "prompt_len": data.prompt_len,
            "global_test": splits.global_test,
        }
        for client_id, (train, test) in enumerate(zip(splits.client_train, splits.client_test)):
            if len(train) or len(test):
                arrays[f"train_{client_id}"], arrays[f"test_{client_id}"] = train, test
        if splits.label_table is not None:
            arrays["label_table"] = splits.label_table
        np.savez(staging / "arrays.npz", **arrays)
        meta = {
            "spec": asdict(loaded.spec),
            "tokenizer": tokenizer_ids(loaded.tokenizer),
            "answers": list(data.answers),
            "clients": len(splits.client_train),
        }
        (staging / "meta.json").write_text(json.dumps(meta))
        os.replace(staging, directory)  # a concurrent writer of the same entry may have won: fine
    except OSError:
        pass  # a read-only cache only costs speed
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def load(directory: Path, load_tokenizer: Callable[[], Any]):
    """The :class:`~atoll.experiment.LoadedData` of a cache entry (None if it is missing or damaged)."""
    from atoll.data.tasks import TaskSpec, Tokenized
    from atoll.experiment import LoadedData, Splits

    try:
        meta = json.loads((directory / "meta.json").read_text())
        with np.load(directory / "arrays.npz", allow_pickle=False) as arrays:
            stored = {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, KeyError):
        return None
    empty = np.array([], dtype=np.int64)
    clients = int(meta["clients"])
    data = Tokenized(stored["ids"], stored["offsets"], stored["labels"], stored["prompt_len"], list(meta["answers"]))
    splits = Splits(
        stored["global_test"],
        [stored.get(f"train_{c}", empty) for c in range(clients)],
        [stored.get(f"test_{c}", empty) for c in range(clients)],
        stored.get("label_table"),
    )
    try:
        os.utime(directory)  # most recently used
    except OSError:
        pass
    return LoadedData(TaskSpec(**meta["spec"]), CachedTokenizer(meta["tokenizer"], load_tokenizer), data, splits)


def prune(root: Path, keep: int = KEEP_ENTRIES) -> None:
    """Remove all but the ``keep`` most recently used entries."""
    try:
        entries = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.stat().st_mtime)
    except OSError:
        return
    for stale in entries[: max(0, len(entries) - keep)]:
        shutil.rmtree(stale, ignore_errors=True)


def node_data(config, client_id: int, node_file: Path | None):
    """This node's :class:`~atoll.experiment.LoadedData`: from the cache, else prepared (the whole
    source, or in a node-data run the node's own file) and cached."""
    key = entry_key(config, client_id, node_file)
    if key is not None:
        loaded = load(cache_root(config) / key, lambda: _real_tokenizer(config))
        if loaded is not None:
            return loaded
    loaded = _prepare(config, client_id, node_file)
    if key is not None:
        save(cache_root(config) / key, loaded)
        prune(cache_root(config))
    return loaded


def _prepare(config, client_id: int, node_file: Path | None):
    from atoll.experiment import LoadedData, load_data

    if node_file is not None:
        from atoll.engines.flower.node_data import load_node_data

        return load_node_data(config, client_id, node_file)
    _, spec, tokenizer, data, splits = load_data(config)
    return LoadedData(spec, tokenizer, data, splits)


def _real_tokenizer(config):
    """The run's tokenizer, loaded as :func:`atoll.experiment.load_data` loads it."""
    from atoll.data.sources import load_source
    from atoll.data.tasks import default_cache_dir, resolve_task
    from atoll.experiment import _subset, split_seed
    from atoll.models.registry import load_tokenizer

    cache_dir = Path(config.data.cache_dir).expanduser() if config.data.cache_dir else default_cache_dir()

    def corpus() -> list[str]:
        raw = load_source(config.data.source)
        spec = resolve_task(config.data, raw)
        return spec.corpus(_subset(raw, config.data.max_examples, split_seed(config))[0])

    return load_tokenizer(config.model.name, corpus, cache_dir)
