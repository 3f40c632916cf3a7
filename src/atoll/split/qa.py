"""Extractive question answering (SQuAD format): reading files, tokenising question + context with
the answer's token span, picking the best span from start/end logits, and the SQuAD metrics.

Files: the official SQuAD v1.1 JSON (``data -> paragraphs -> qas``), or JSON/JSONL rows with
``context``, ``question`` and ``answers`` (``{"text": [...], "answer_start": [...]}`` as in
Hugging Face's ``squad``, or a list of ``{"text", "answer_start"}``). Metrics: exact match and
token F1 after SQuAD's normalisation (Rajpurkar et al., "SQuAD: 100,000+ Questions for Machine
Comprehension of Text", EMNLP 2016).
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atoll.errors import DataError


@dataclass
class QAExample:
    context: str
    question: str
    answers: list[str]
    answer_start: int


def _row_answers(row: dict, where: str) -> tuple[list[str], list[int]]:
    answers = row.get("answers")
    if isinstance(answers, dict):
        texts, starts = list(answers.get("text", [])), list(answers.get("answer_start", []))
    elif isinstance(answers, list):
        texts = [a.get("text", "") for a in answers if isinstance(a, dict)]
        starts = [a.get("answer_start", -1) for a in answers if isinstance(a, dict)]
    else:
        raise DataError(f"{where} has no 'answers'", 'give answers as {"text": [...], "answer_start": [...]}')
    if not texts or len(texts) != len(starts):
        raise DataError(
            f"{where} has no answer, or answer texts and starts of different lengths", "give at least one answer with its start"
        )
    return [str(t) for t in texts], [int(s) for s in starts]


def read_squad(path: str | Path) -> list[QAExample]:
    """Every answerable question of a SQuAD-format file; the first answer's span is trained on."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"question-answering file '{path}' does not exist", "check data.source")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
            if isinstance(data, dict) and "data" in data:
                rows = [
                    {"context": paragraph["context"], "question": qa["question"], "answers": qa["answers"]}
                    for article in data["data"]
                    for paragraph in article["paragraphs"]
                    for qa in paragraph["qas"]
                ]
            elif isinstance(data, list):
                rows = data
            else:
                raise DataError(f"'{path}' is neither SQuAD JSON (with 'data') nor a list of rows")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read '{path}' as SQuAD: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    examples = []
    for number, row in enumerate(rows):
        where = f"question {number} of '{path}'"
        if not isinstance(row, dict) or not row.get("context") or not row.get("question"):
            raise DataError(f"{where} lacks a context or a question")
        texts, starts = _row_answers(row, where)
        context = str(row["context"])
        if context[starts[0] : starts[0] + len(texts[0])] != texts[0]:
            raise DataError(f"{where}: answer '{texts[0]}' is not at character {starts[0]} of its context", "fix answer_start")
        examples.append(QAExample(context, str(row["question"]), texts, starts[0]))
    if not examples:
        raise DataError(f"'{path}' holds no questions")
    return examples


@dataclass
class QAData:
    """Tokenised question-context pairs with the answer's token span."""

    examples: list[QAExample]
    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    char_spans: list[np.ndarray]  # per token (start, end) in the context; (-1, -1) outside it
    starts: np.ndarray
    ends: np.ndarray
    dropped: int = 0
    groups: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # context id per example

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        return np.array([len(ids) for ids in self.input_ids])


def tokenize_qa(examples: list[QAExample], tokenizer, max_length: int) -> QAData:
    """Question first, context second (truncated); examples whose answer is cut off are dropped."""
    encoded = tokenizer(
        [e.question for e in examples],
        [e.context for e in examples],
        truncation="only_second",
        max_length=max_length,
        return_offsets_mapping=True,
        return_token_type_ids=True,
    )
    kept: list[QAExample] = []
    ids, types, spans, starts, ends, groups = [], [], [], [], [], []
    context_ids: dict[str, int] = {}
    for index, example in enumerate(examples):
        sequence = encoded.sequence_ids(index)
        offsets = encoded["offset_mapping"][index]
        char_spans = np.array([o if s == 1 else (-1, -1) for o, s in zip(offsets, sequence)], dtype=np.int64)
        answer_start, answer_end = example.answer_start, example.answer_start + len(example.answers[0])
        inside = [t for t, (a, b) in enumerate(char_spans) if a >= 0 and b > answer_start and a < answer_end]
        if not inside or char_spans[inside[0]][0] > answer_start or char_spans[inside[-1]][1] < answer_end:
            continue
        kept.append(example)
        ids.append(np.array(encoded["input_ids"][index], dtype=np.int64))
        token_types = encoded.get("token_type_ids")
        types.append(np.array(token_types[index] if token_types is not None else [0] * len(ids[-1]), dtype=np.int64))
        spans.append(char_spans)
        starts.append(inside[0])
        ends.append(inside[-1])
        groups.append(context_ids.setdefault(example.context, len(context_ids)))
    if not kept:
        raise DataError("no question's answer fits in model.max_length tokens", "raise model.max_length")
    return QAData(kept, ids, types, spans, np.array(starts), np.array(ends), len(examples) - len(kept), np.array(groups))


def best_span(start_logits: np.ndarray, end_logits: np.ndarray, char_spans: np.ndarray, max_tokens: int) -> tuple[int, int]:
    """Context tokens (i, j), i <= j < i + max_tokens, maximising start[i] + end[j]."""
    context = np.flatnonzero(char_spans[:, 0] >= 0)
    best, chosen = -np.inf, (int(context[0]), int(context[0]))
    for i in context:
        window = context[(context >= i) & (context < i + max_tokens)]
        j = window[np.argmax(end_logits[window])]
        score = start_logits[i] + end_logits[j]
        if score > best:
            best, chosen = score, (int(i), int(j))
    return chosen


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: list[str]) -> float:
    """The best token-overlap F1 of ``prediction`` against any gold answer."""
    best = 0.0
    predicted = normalize_answer(prediction).split()
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((Counter(predicted) & Counter(gold)).values())
        if not predicted or not gold:
            best = max(best, float(predicted == gold))
            continue
        if common == 0:
            continue
        precision, recall = common / len(predicted), common / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best
