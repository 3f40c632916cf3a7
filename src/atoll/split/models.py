"""Loading the task model each party carves its slices from, through atoll's model registry.

The model party never sees the data, and so never the corpus a built-in model's tokenizer is
trained on; it only needs the vocabulary's size and special ids to build the same
(seeded) model, and the data party sends those in its hello.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from atoll.split.families import HeadKind


def head_kind(task: str) -> HeadKind:
    """The task head a data task needs."""
    if task == "classification":
        return "classification"
    if task == "qa":
        return "question-answering"
    return "causal-lm"


@dataclass(frozen=True)
class VocabularyFacts:
    """What a model needs from its tokenizer to be built: the vocabulary size and special ids.
    Stands in for the tokenizer in :func:`atoll.models.registry.load_base_model`."""

    size: int
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None

    def __len__(self) -> int:
        return self.size

    @classmethod
    def of(cls, tokenizer) -> "VocabularyFacts":
        return cls(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)

    def to_dict(self) -> dict:
        return asdict(self)


def load_task_model(name: str, head: HeadKind, num_labels: int, vocabulary: VocabularyFacts, dtype: str, seed: int) -> nn.Module:
    """The full task model (every party loads the same one, then keeps only its slices)."""
    from atoll.models.registry import load_base_model

    return load_base_model(
        name,
        generative=head == "causal-lm",
        num_labels=max(num_labels, 1),
        tokenizer=vocabulary,
        dtype=dtype,
        seed=seed,
        question_answering=head == "question-answering",
    )
