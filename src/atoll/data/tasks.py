"""Tasks: turn raw columns into token sequences with what the loss and the metric need.

- classification: text -> class id; metric accuracy (and macro-F1).
- sft: instruction -> response; the loss is on the response tokens only; metric answer loss.
- math: GSM8K-style question -> worked answer ending in ``#### N``; trained like sft, evaluated
  by greedy generation, answer extraction and exact match.
- completion: a text -> its continuation, concatenated as they are (no template); next-token
  prediction on the continuation; metrics loss, perplexity, next-token accuracy.

Tokenisation happens once per (source, columns, tokenizer, max_length) and is cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from atoll.config import DataConfig
from atoll.data.sources import RawData
from atoll.errors import DataError

if TYPE_CHECKING:  # numpy is imported where arrays are made: the resolve step checks columns without it
    import numpy as np

SFT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
MATH_TEMPLATE = "Question: {prompt}\nAnswer:"
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class TaskSpec:
    """What is learned from which columns."""

    kind: str
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    label_names: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_generative(self) -> bool:
        return self.kind in ("sft", "math", "completion")

    def prompt_text(self, prompt: str) -> str:
        if self.kind == "completion":
            return prompt
        template = MATH_TEMPLATE if self.kind == "math" else SFT_TEMPLATE
        return template.format(prompt=prompt.strip())

    def response_text(self, response: str) -> str:
        if self.kind == "completion":
            return response
        if self.kind == "math":
            return " " + _CALCULATOR.sub("", response).strip()
        return response.strip()

    def corpus(self, raw: RawData) -> list[str]:
        """All text this task will tokenise (used to train a tokenizer offline)."""
        if self.kind == "classification":
            return [str(t) for t in raw.columns[self.text_column]]
        prompts = raw.columns[self.prompt_column]
        responses = raw.columns[self.response_column]
        return [self.prompt_text(str(p)) + self.response_text(str(r)) for p, r in zip(prompts, responses)]


_TASK_COLUMNS = {"classification": ("text_column", "label_column"), "generative": ("prompt_column", "response_column")}


def resolve_task(data: DataConfig, raw: RawData) -> TaskSpec:
    """Pick the task and its columns, and check their values: a column that does not exist, a
    column option the task does not read, a missing or empty value are DataErrors naming the row."""
    kind = raw.task if data.task == "auto" else data.task
    shown = ", ".join(repr(name) for name in raw.columns)
    reads = _TASK_COLUMNS["classification" if kind == "classification" else "generative"]
    for option in (o for options in _TASK_COLUMNS.values() for o in options if o not in reads):
        if getattr(data, option) is not None:
            raise DataError(
                f"data.{option} is set but the {kind} task does not read it (it reads data.{reads[0]} and data.{reads[1]})",
                f"remove data.{option}, or set data.task to the task you mean",
            )

    def column(option: str) -> str:
        name = getattr(data, option) or raw.defaults.get(option)
        if name is None:
            raise DataError(f"data.{option} is not set and the source has no default", f"set it to one of the columns: {shown}")
        if name not in raw.columns:
            raise DataError(f"column '{name}' (data.{option}) does not exist in {data.source}", f"columns are: {shown}")
        return name

    def check_values(name: str, blank_allowed: bool) -> None:
        for index, value in enumerate(raw.columns[name]):
            if value is None or (not blank_allowed and isinstance(value, str) and not value.strip()):
                what = "has no value" if value is None else "is empty"
                raise DataError(f"column '{name}' {what} at {raw.where(index)}", "fill or drop that row")
            if isinstance(value, (dict, list)):
                raise DataError(
                    f"column '{name}' holds a {type(value).__name__} at {raw.where(index)}, not text", "use a column of plain values"
                )

    if kind == "classification":
        spec = TaskSpec(kind, text_column=column("text_column"), label_column=column("label_column"))
        check_values(spec.text_column, blank_allowed=False)
        check_values(spec.label_column, blank_allowed=False)
        values = raw.columns[spec.label_column]
        if data.labels:
            spec.label_names = [str(v) for v in data.labels]
            if len(set(spec.label_names)) != len(spec.label_names):
                raise DataError("data.labels names a label twice", "list each label once, in class-id order")
            check_labels(spec, raw, raw.description or data.source)
        else:
            spec.label_names = sorted({str(v) for v in values}, key=_natural_key)
        if spec.num_labels < 2:
            raise DataError(f"label column '{spec.label_column}' has a single class", "classification needs at least 2")
        if spec.num_labels > max(100, len(values) // 2):
            raise DataError(
                f"label column '{spec.label_column}' has {spec.num_labels} distinct values in {len(values)} rows, too many to be classes",
                "check data.label_column (classification learns a few classes, each with many examples)",
            )
        return spec
    spec = TaskSpec(kind, prompt_column=column("prompt_column"), response_column=column("response_column"))
    check_values(spec.prompt_column, blank_allowed=kind == "completion")
    check_values(spec.response_column, blank_allowed=False)
    return spec


def check_labels(spec: TaskSpec, raw: RawData, where: str) -> None:
    """Every label of ``raw`` is one of the spec's (a second source, or a label set fixed by data.labels)."""
    unknown = sorted({str(v) for v in raw.columns[spec.label_column]} - set(spec.label_names), key=_natural_key)
    if unknown:
        shown = ", ".join(repr(v) for v in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise DataError(
            f"label column '{spec.label_column}' of {where} has values outside the label set: {shown}",
            "add them to data.labels (or drop those rows)",
        )


def check_source_fits(spec: TaskSpec, raw: RawData, where: str) -> None:
    """``raw`` (a test set or a node's file) has the columns the task reads and, for
    classification, only labels of the spec's label set."""
    needed = [spec.text_column, spec.label_column] if spec.kind == "classification" else [spec.prompt_column, spec.response_column]
    for name in needed:
        if name not in raw.columns:
            raise DataError(f"column '{name}' does not exist in {where}", f"columns are: {', '.join(raw.columns)}")
    if spec.kind == "classification":
        if any(v is None or (isinstance(v, str) and not v.strip()) for v in raw.columns[spec.label_column]):
            raise DataError(f"label column '{spec.label_column}' of {where} has empty values", "drop or fill those rows")
        check_labels(spec, raw, where)


def _natural_key(text: str) -> tuple:
    return (0, float(text), text) if _is_number(text) else (1, 0.0, text)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@dataclass
class Tokenized:
    """Variable-length token sequences stored flat, with per-example labels."""

    ids: np.ndarray  # int32, all sequences concatenated
    offsets: np.ndarray  # int64, n + 1
    labels: np.ndarray  # int64, class id (classification) or -1
    prompt_len: np.ndarray  # int32, tokens of prompt (generative) or 0
    answers: list[str] = field(default_factory=list)  # math: gold final answers

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, index: int) -> np.ndarray:
        return self.ids[self.offsets[index] : self.offsets[index + 1]]

    def lengths(self) -> np.ndarray:
        return self.offsets[1:] - self.offsets[:-1]


def concat_tokenized(first: Tokenized, second: Tokenized) -> Tokenized:
    """``second``'s examples after ``first``'s (indices of ``second`` shift by ``len(first)``)."""
    import numpy as np

    offsets = np.concatenate([first.offsets, second.offsets[1:] + first.offsets[-1]])
    return Tokenized(
        np.concatenate([first.ids, second.ids]).astype(np.int32),
        offsets.astype(np.int64),
        np.concatenate([first.labels, second.labels]).astype(np.int64),
        np.concatenate([first.prompt_len, second.prompt_len]).astype(np.int32),
        list(first.answers) + list(second.answers) if (first.answers or second.answers) else [],
    )


def extract_answer(text: str, strict: bool = False) -> str | None:
    """The final numeric answer of a GSM8K-style text: the number after '####', else (unless
    ``strict``) the last number in the text."""
    if strict and "####" not in text:
        return None
    tail = text.split("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    chosen = numbers[0] if "####" in text else numbers[-1]
    return _canonical_number(chosen)


def _canonical_number(text: str) -> str:
    text = text.replace(",", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else repr(value)


def _tokenize_uncached(spec: TaskSpec, raw: RawData, tokenizer, max_length: int) -> Tokenized:
    import numpy as np

    sequences: list[list[int]] = []
    prompt_lens: list[int] = []
    labels: list[int] = []
    answers: list[str] = []
    eos = tokenizer.eos_token_id
    if spec.kind == "classification":
        index = {name: i for i, name in enumerate(spec.label_names)}
        texts = [str(t) if t is not None else "" for t in raw.columns[spec.text_column]]
        encoded = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        sequences = [list(ids) for ids in encoded]
        labels = [index[str(v)] for v in raw.columns[spec.label_column]]
        prompt_lens = [0] * len(sequences)
    else:
        prompts = [spec.prompt_text(str(p or "")) for p in raw.columns[spec.prompt_column]]
        responses = [spec.response_text(str(r or "")) for r in raw.columns[spec.response_column]]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        for prompt, response in zip(prompt_ids, response_ids):
            prompt = bos + list(prompt)
            response = list(response) + ([eos] if eos is not None else [])
            keep_prompt = max(1, min(len(prompt), max_length - min(len(response), max_length // 2)))
            prompt = prompt[-keep_prompt:]
            response = response[: max_length - len(prompt)]
            sequences.append(prompt + response)
            prompt_lens.append(len(prompt))
            labels.append(-1)
        if spec.kind == "math":
            answers = [extract_answer(str(r or "")) or "" for r in raw.columns[spec.response_column]]
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    if (lengths == 0).any():
        raise DataError("some examples tokenise to nothing", "drop empty rows from the data")
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for s in sequences for t in s), dtype=np.int32, count=int(offsets[-1]))
    return Tokenized(flat, offsets, np.array(labels, dtype=np.int64), np.array(prompt_lens, dtype=np.int32), answers)


def default_cache_dir() -> Path:
    return Path(os.environ.get("ATOLL_CACHE", Path.home() / ".cache" / "atoll"))


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what maps text to ids (not of call-time truncation/padding settings, which the
    fast tokenizer stores in the same JSON once it has been called)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        description = json.loads(backend.to_str())
        description.pop("truncation", None)
        description.pop("padding", None)
        text = json.dumps(description, sort_keys=True)
    else:
        text = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tokenize(spec: TaskSpec, raw: RawData, tokenizer, max_length: int, cache_dir: Path | None, subset_key: str) -> Tokenized:
    """Tokenise ``raw`` for ``spec``, reusing an on-disk cache keyed by everything that matters."""
    import numpy as np

    key_text = json.dumps(
        [
            raw.fingerprint,
            subset_key,
            spec.kind,
            spec.text_column,
            spec.label_column,
            spec.prompt_column,
            spec.response_column,
            spec.label_names,
            tokenizer_fingerprint(tokenizer),
            max_length,
            "v1",
        ]
    )
    key = hashlib.sha256(key_text.encode()).hexdigest()[:20]
    path = (cache_dir or default_cache_dir()) / f"tokens-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                answers = json.loads(str(data["answers"])) if "answers" in data else []
                return Tokenized(data["ids"], data["offsets"], data["labels"], data["prompt_len"], answers)
        except Exception:
            pass  # a damaged cache entry is rebuilt below
    result = _tokenize_uncached(spec, raw, tokenizer, max_length)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(
            temporary,
            ids=result.ids,
            offsets=result.offsets,
            labels=result.labels,
            prompt_len=result.prompt_len,
            answers=np.array(json.dumps(result.answers)),
        )
        os.replace(temporary, path)
    except OSError:
        pass  # caching is an optimisation; a read-only home still runs
    return result
