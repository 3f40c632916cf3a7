"""What the text-level defenses (SanText, CusText, RanText) share: the vocabulary they may emit,
the embedding distances they sample by, and the replacement of token ids in a batch.

They work on the model's tokens (sub-words here, where the papers use words), in the space of the
head's own word-embedding table (public: the pretrained model's). The candidate vocabulary is
the set of tokens in the data party's own training text (SanText's choice: the corpus
vocabulary), special tokens never change and are never emitted.
"""

from __future__ import annotations

from typing import Callable

from atoll.split.defenses.base import DefenseContext


def candidate_ids(context: DefenseContext):
    """Token ids a sanitiser may emit: the data party's corpus vocabulary (else the whole table),
    minus special tokens."""
    import torch

    size = context.word_embeddings.shape[0]
    counts = context.token_counts() if context.token_counts is not None else None
    allowed = torch.ones(size, dtype=torch.bool) if counts is None else torch.from_numpy(counts[:size] > 0)
    special = [i for i in (getattr(context.tokenizer, "all_special_ids", None) or []) if 0 <= i < size]
    allowed[special] = False
    return allowed.nonzero().squeeze(-1)


def replace_tokens(batch: dict, choose: Callable, special_ids: set[int]) -> dict:
    """A copy of ``batch`` whose real, non-special ``input_ids`` are replaced by ``choose(ids)``
    (a 1-D tensor of unique ids -> the replacement of each)."""
    import torch

    ids = batch["input_ids"]
    mask = batch["attention_mask"].bool()
    special = torch.tensor(sorted(special_ids), dtype=ids.dtype) if special_ids else ids.new_zeros(0)
    editable = mask & ~torch.isin(ids, special)
    if not editable.any():
        return batch
    positions = ids[editable]
    replaced = choose(positions)
    new_ids = ids.clone()
    new_ids[editable] = replaced
    return {**batch, "input_ids": new_ids}


def sample_rows(logits, generator):
    """One index per row of ``logits`` (unnormalised log-probabilities), from ``generator``."""
    import torch

    probabilities = torch.softmax(logits.double(), dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
