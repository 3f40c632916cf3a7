"""Batches padded to the longest sequence in the batch (not to a fixed length)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from atoll.data.tasks import Tokenized

IGNORE = -100


def collate(data: Tokenized, indices: np.ndarray, pad_id: int, kind: str, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Pad ``indices`` of ``data`` to a batch. Classification: ``labels`` are class ids.
    Generative: ``labels`` are the tokens of the answer only (prompt and padding are -100)."""
    lengths = [int(data.offsets[i + 1] - data.offsets[i]) for i in indices]
    width = max(lengths)
    input_ids = np.full((len(indices), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(indices), width), dtype=np.int64)
    token_labels = np.full((len(indices), width), IGNORE, dtype=np.int64) if kind != "classification" else None
    for row, (index, length) in enumerate(zip(indices, lengths)):
        sequence = data.ids[data.offsets[index] : data.offsets[index + 1]]
        start = width - length if left_pad else 0
        input_ids[row, start : start + length] = sequence
        attention[row, start : start + length] = 1
        if token_labels is not None:
            prompt = int(data.prompt_len[index])
            token_labels[row, start + prompt : start + length] = sequence[prompt:]
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention)}
    if kind == "classification":
        batch["labels"] = torch.from_numpy(data.labels[np.asarray(indices)].astype(np.int64))
    else:
        batch["labels"] = torch.from_numpy(token_labels)
    return batch


def prompt_batch(data: Tokenized, indices: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts only (for generation)."""
    lengths = [int(data.prompt_len[i]) for i in indices]
    width = max(lengths)
    input_ids = np.full((len(indices), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(indices), width), dtype=np.int64)
    for row, (index, length) in enumerate(zip(indices, lengths)):
        input_ids[row, width - length :] = data.ids[data.offsets[index] : data.offsets[index] + length]
        attention[row, width - length :] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention)}


def grouped_order(data: Tokenized, indices: np.ndarray, batch_size: int, rng: np.random.Generator, group: int = 32) -> list[np.ndarray]:
    """Shuffled batches of similar length (less padding): shuffle, sort windows of ``group``
    batches by length, cut into batches, shuffle the batches."""
    order = rng.permutation(indices)
    lengths = data.lengths()
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def training_batches(
    data: Tokenized,
    indices: np.ndarray,
    batch_size: int,
    pad_id: int,
    kind: str,
    rng: np.random.Generator,
    group_by_length: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of shuffled batches over ``indices``, reshuffled every pass."""
    if len(indices) == 0:
        raise ValueError("a client with no training examples cannot train")
    while True:
        if group_by_length:
            batches = grouped_order(data, indices, batch_size, rng)
        else:
            order = rng.permutation(indices)
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in batches:
            yield collate(data, batch, pad_id, kind)


def evaluation_batches(data: Tokenized, indices: np.ndarray, batch_size: int, pad_id: int, kind: str) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in length order (less padding), deterministic."""
    order = np.asarray(indices)[np.argsort(data.lengths()[indices], kind="stable")]
    for start in range(0, len(order), batch_size):
        yield collate(data, order[start : start + batch_size], pad_id, kind)
