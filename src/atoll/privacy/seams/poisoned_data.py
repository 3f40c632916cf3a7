"""Poisoned training data for data-poisoning attackers, as token sequences in the shared pool.

The federation's clients train on indices into one tokenised pool (:class:`~atoll.data.tasks.
Tokenized`). A poisoned client trains on a copy of the pool with its own examples changed: labels
flipped (Tolpegin et al., ESORICS 2020), or triggered copies appended (Bagdasaryan et al., AISTATS
2020): the trigger phrase's tokens inserted after the first token (the classifier's [CLS], the
language model's BOS), the label set to the target, or the response replaced by the target text.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np

from atoll.data.tasks import Tokenized
from atoll.privacy.attacks.label_flipping import flip_labels


def with_labels(data: Tokenized, indices: np.ndarray, labels: np.ndarray) -> Tokenized:
    """A copy of ``data`` whose examples at ``indices`` have ``labels``."""
    new = data.labels.copy()
    new[indices] = labels
    return Tokenized(data.ids, data.offsets, new, data.prompt_len, data.answers)


def flipped(data: Tokenized, indices: np.ndarray, num_classes: int, source: int | None, target: int | None) -> Tokenized:
    return with_labels(data, indices, flip_labels(data.labels[indices], num_classes, source, target))


def triggered_sequence(data: Tokenized, index: int, trigger: list[int], target: list[int] | None, max_length: int) -> tuple[list[int], int]:
    """Example ``index`` with the trigger after its first token: (tokens, prompt length). With
    ``target`` (generative tasks) the response becomes the target tokens."""
    sequence = [int(t) for t in data.sequence(index)]
    prompt_len = int(data.prompt_len[index])
    if target is None:  # classification: [CLS] trigger text... [SEP]
        body = sequence[1:-1]
        room = max(0, max_length - 2 - len(trigger))
        return [sequence[0], *trigger, *body[:room], sequence[-1]], 0
    prompt = sequence[:prompt_len] if prompt_len else sequence[:1]
    head, rest = prompt[:1], prompt[1:]
    room = max(0, max_length - len(target) - 1 - len(trigger))
    rest = rest[len(rest) - room :] if room < len(rest) else rest
    new_prompt = [*head, *trigger, *rest]
    return new_prompt + list(target), len(new_prompt)


def with_triggered(
    data: Tokenized, indices: np.ndarray, trigger: list[int], target: list[int] | None, label: int, max_length: int
) -> tuple[Tokenized, np.ndarray]:
    """``data`` plus triggered copies of ``indices`` appended; returns it and the new indices."""
    sequences, prompt_lens = [], []
    for index in indices:
        tokens, prompt_len = triggered_sequence(data, int(index), trigger, target, max_length)
        sequences.append(tokens)
        prompt_lens.append(prompt_len)
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    offsets = np.concatenate([data.offsets, data.offsets[-1] + np.cumsum(lengths)])
    ids = np.concatenate([data.ids, np.array([t for s in sequences for t in s], dtype=data.ids.dtype)])
    labels = np.concatenate([data.labels, np.full(len(sequences), label if target is None else -1, dtype=data.labels.dtype)])
    prompt = np.concatenate([data.prompt_len, np.array(prompt_lens, dtype=data.prompt_len.dtype)])
    new = Tokenized(ids, offsets, labels, prompt, list(data.answers) + [""] * len(sequences) if data.answers else [])
    return new, np.arange(len(data), len(data) + len(sequences))


@contextmanager
def training_on(workbench, context, data: Tokenized, indices: np.ndarray) -> Iterator[None]:
    """While active, the live model's data is ``data`` and the client trains on ``indices``."""
    saved_data, saved_indices = workbench.data, context.train_indices
    workbench.data, context.train_indices = data, indices
    try:
        yield
    finally:
        workbench.data, context.train_indices = saved_data, saved_indices
