"""Split tasks: batches of atoll's tokenised data (or of SQuAD pairs), the loss the data party
computes from the task outputs, and the metrics.

A batch is a dict of tensors: ``input_ids``, ``attention_mask``, task targets (``labels``, or
``start_positions``/``end_positions``), for encoders ``token_type_ids``, and ``index`` (the
examples' ids, kept by the data party to score attacks later; never sent).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from atoll.data.batching import IGNORE, collate
from atoll.data.tasks import Tokenized
from atoll.split.families import HeadKind
from atoll.split.qa import QAData, best_span, exact_match, token_f1


class SplitData:
    """Examples of one task, batched for a data party."""

    kind: HeadKind

    def __len__(self) -> int:
        raise NotImplementedError

    def lengths(self) -> np.ndarray:
        raise NotImplementedError

    def collate(self, indices: np.ndarray) -> dict[str, Tensor]:
        raise NotImplementedError

    def partition_labels(self) -> np.ndarray:
        """What label-skewed partitions split by (class ids; zeros for other tasks)."""
        return np.zeros(len(self), dtype=np.int64)

    def train_batches(self, indices: np.ndarray, batch_size: int, rng: np.random.Generator, by_length: bool) -> Iterator[dict[str, Tensor]]:
        """An endless stream of shuffled batches, reshuffled every pass."""
        while True:
            if by_length:
                batches = _grouped(self.lengths(), indices, batch_size, rng)
            else:
                order = rng.permutation(indices)
                batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            for batch in batches:
                yield self.collate(np.asarray(batch))

    def eval_batches(self, indices: np.ndarray, batch_size: int) -> Iterator[dict[str, Tensor]]:
        order = np.asarray(indices)[np.argsort(self.lengths()[indices], kind="stable")]
        for start in range(0, len(order), batch_size):
            yield self.collate(order[start : start + batch_size])


def _grouped(lengths: np.ndarray, indices: np.ndarray, batch_size: int, rng: np.random.Generator, group: int = 32) -> list[np.ndarray]:
    order = rng.permutation(indices)
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class TokenizedData(SplitData):
    """atoll's tokenised classification or generative data (data/tasks.py)."""

    def __init__(self, data: Tokenized, pad_id: int, task: str):
        self.data = data
        self.pad_id = pad_id
        self.task = task
        self.kind = "classification" if task == "classification" else "causal-lm"

    def __len__(self) -> int:
        return len(self.data)

    def lengths(self) -> np.ndarray:
        return self.data.lengths()

    def partition_labels(self) -> np.ndarray:
        return self.data.labels if self.kind == "classification" else super().partition_labels()

    def collate(self, indices: np.ndarray) -> dict[str, Tensor]:
        batch = collate(self.data, indices, self.pad_id, "classification" if self.kind == "classification" else "sft")
        batch["index"] = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return batch


class QuestionAnsweringData(SplitData):
    kind: HeadKind = "question-answering"

    def __init__(self, data: QAData, pad_id: int):
        self.data = data
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.data)

    def lengths(self) -> np.ndarray:
        return self.data.lengths()

    def collate(self, indices: np.ndarray) -> dict[str, Tensor]:
        width = max(len(self.data.input_ids[i]) for i in indices)
        ids = np.full((len(indices), width), self.pad_id, dtype=np.int64)
        types = np.zeros((len(indices), width), dtype=np.int64)
        mask = np.zeros((len(indices), width), dtype=np.int64)
        for row, index in enumerate(indices):
            length = len(self.data.input_ids[index])
            ids[row, :length] = self.data.input_ids[index]
            types[row, :length] = self.data.token_type_ids[index]
            mask[row, :length] = 1
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "token_type_ids": torch.from_numpy(types),
            "start_positions": torch.from_numpy(self.data.starts[indices].astype(np.int64)),
            "end_positions": torch.from_numpy(self.data.ends[indices].astype(np.int64)),
            "index": torch.from_numpy(np.asarray(indices, dtype=np.int64)),
        }


# -- losses (computed by the data party: labels never leave it) ------------------------------------


def task_loss(kind: HeadKind, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """The loss the unsplit Hugging Face model computes for the same outputs and targets."""
    if kind == "classification":
        return F.cross_entropy(outputs.float(), batch["labels"])
    if kind == "question-answering":
        start, end = outputs.float().unbind(-1)
        ignored = start.shape[1]
        starts = batch["start_positions"].clamp(0, ignored)
        ends = batch["end_positions"].clamp(0, ignored)
        return (F.cross_entropy(start, starts, ignore_index=ignored) + F.cross_entropy(end, ends, ignore_index=ignored)) / 2
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]
    return F.cross_entropy(outputs.float().reshape(-1, outputs.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


class Metrics:
    """Accumulates a task's metrics over evaluation batches."""

    def __init__(self, kind: HeadKind, num_labels: int = 0, qa: QAData | None = None, max_answer_tokens: int = 30):
        self.kind = kind
        self.num_labels = num_labels
        self.qa = qa
        self.max_answer_tokens = max_answer_tokens
        self.loss_sum = 0.0
        self.count = 0
        self.correct = 0
        self.tokens = 0
        self.confusion = np.zeros((max(num_labels, 1), max(num_labels, 1)), dtype=np.int64)
        self.exact = 0.0
        self.f1 = 0.0

    def update(self, outputs: Tensor, batch: dict[str, Tensor]) -> None:
        outputs = outputs.float()
        if self.kind == "classification":
            labels = batch["labels"]
            self.loss_sum += float(F.cross_entropy(outputs, labels, reduction="sum"))
            np.add.at(self.confusion, (labels.numpy(), outputs.argmax(-1).numpy()), 1)
            self.count += len(labels)
        elif self.kind == "causal-lm":
            shifted = outputs[:, :-1].reshape(-1, outputs.shape[-1])
            targets = batch["labels"][:, 1:].reshape(-1)
            keep = targets != IGNORE
            self.loss_sum += float(F.cross_entropy(shifted[keep], targets[keep], reduction="sum"))
            self.correct += int((shifted[keep].argmax(-1) == targets[keep]).sum())
            self.tokens += int(keep.sum())
            self.count += int(batch["input_ids"].shape[0])
        else:
            self.loss_sum += float(task_loss(self.kind, outputs, batch)) * len(batch["index"])
            self.count += len(batch["index"])
            assert self.qa is not None
            for row, index in enumerate(batch["index"].tolist()):
                spans = self.qa.char_spans[index]
                length = len(spans)
                i, j = best_span(outputs[row, :length, 0].numpy(), outputs[row, :length, 1].numpy(), spans, self.max_answer_tokens)
                example = self.qa.examples[index]
                predicted = example.context[spans[i][0] : spans[j][1]]
                self.exact += exact_match(predicted, example.answers)
                self.f1 += token_f1(predicted, example.answers)

    def result(self) -> dict[str, float]:
        if self.count == 0:
            return {}
        if self.kind == "classification":
            true_positive = np.diag(self.confusion).astype(float)
            predicted, actual = self.confusion.sum(0), self.confusion.sum(1)
            precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
            recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
            f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(true_positive), where=(precision + recall) > 0)
            present = actual > 0
            return {
                "accuracy": float(true_positive.sum() / self.count),
                "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
                "loss": self.loss_sum / self.count,
                "examples": float(self.count),
            }
        if self.kind == "causal-lm":
            loss = self.loss_sum / max(1, self.tokens)
            return {
                "loss": loss,
                "perplexity": math.exp(min(loss, 50.0)),
                "token_accuracy": self.correct / max(1, self.tokens),
                "examples": float(self.count),
            }
        return {
            "loss": self.loss_sum / self.count,
            "exact_match": self.exact / self.count,
            "f1": self.f1 / self.count,
            "examples": float(self.count),
        }
