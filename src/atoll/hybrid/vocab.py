"""Vocabulary alignment between the edge model and a cloud model it knows only by token strings.

The cloud returns its top-k next tokens as strings (OpenAI ``top_logprobs``); the edge maps each
string to one of its own token ids through the bytes both stand for:

- **shared**: the edge has a token with exactly these bytes -> that id;
- **prefix** (``fusion.unshared: prefix``, default): no identical edge token -> the longest edge
  token the string starts with. The cloud's probability that the text continues with "hello" is
  mass the edge can only emit as a first piece ("hel"); the next step asks the cloud again from
  the longer text, so the rest follows. Byte-level edge vocabularies hold all 256 single bytes,
  so every non-empty string has such a prefix;
- **dropped** (``fusion.unshared: drop``, or a string that stands for no definite bytes: U+FFFD
  from a server that decoded half a character, ``token_id:N``, an empty string): its mass is left
  out and the rest renormalised;
- **eos**: a string in ``cloud.eos_strings`` (or the edge's own EOS text) -> the edge's EOS.

Several cloud strings that land on one edge id have their probabilities added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from atoll.hybrid.tokens import from_wire, token_bytes


@dataclass
class Aligned:
    """The cloud's top-k in edge ids: unique ids, their summed log-probabilities, and how each
    cloud string was mapped (counts), plus the cloud's total top-k mass before dropping."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    topk_mass: float
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def residual_mass(self) -> float:
        """Probability the cloud put outside its top-k (never negative)."""
        return max(0.0, 1.0 - self.topk_mass)


class EdgeVocabulary:
    """The edge tokenizer seen as bytes, for mapping cloud token strings onto edge ids."""

    def __init__(self, tokenizer, eos_strings: list[str] | tuple[str, ...] = (), unshared: str = "prefix"):
        if unshared not in ("prefix", "drop"):
            raise ValueError(f"unshared must be 'prefix' or 'drop', got {unshared!r}")
        self.unshared = unshared
        self.bytes_of = token_bytes(tokenizer)
        self.id_of: dict[bytes, int] = {}
        for token_id, data in enumerate(self.bytes_of):
            if data and data not in self.id_of:  # a duplicate surface form keeps its first id
                self.id_of[data] = token_id
        self.longest = max((len(b) for b in self.id_of), default=0)
        self.eos_id: int | None = tokenizer.eos_token_id
        self.eos_strings = set(eos_strings) | ({tokenizer.eos_token} if tokenizer.eos_token else set())
        self._memo: dict[str, tuple[int | None, str]] = {}

    def __len__(self) -> int:
        return len(self.bytes_of)

    def map_string(self, text: str) -> tuple[int | None, str]:
        """(edge id or None, how): how is 'shared', 'prefix', 'eos' or 'dropped'."""
        hit = self._memo.get(text)
        if hit is None:
            hit = self._memo[text] = self._map(text)
        return hit

    def _map(self, text: str) -> tuple[int | None, str]:
        if text in self.eos_strings:
            return (self.eos_id, "eos") if self.eos_id is not None else (None, "dropped")
        data = from_wire(text)
        if not data:
            return None, "dropped"
        exact = self.id_of.get(data)
        if exact is not None:
            return exact, "shared"
        if self.unshared == "drop":
            return None, "dropped"
        for length in range(min(len(data), self.longest), 0, -1):
            prefix = self.id_of.get(data[:length])
            if prefix is not None:
                return prefix, "prefix"
        return None, "dropped"

    def align(self, top: list[tuple[str, float]]) -> Aligned:
        """Map the cloud's (string, log-prob) pairs onto unique edge ids (probabilities summed)."""
        counts = {"shared": 0, "prefix": 0, "eos": 0, "dropped": 0}
        mass: dict[int, float] = {}
        total = 0.0
        for text, logprob in top:
            probability = math.exp(logprob)
            total += probability
            token_id, how = self.map_string(text)
            counts[how] += 1
            if token_id is not None:
                mass[token_id] = mass.get(token_id, 0.0) + probability
        ids = torch.tensor(list(mass), dtype=torch.long)
        logprobs = torch.tensor([math.log(p) if p > 0 else -math.inf for p in mass.values()], dtype=torch.float32)
        return Aligned(ids, logprobs, total, counts)


def overlap(edge_tokenizer, cloud_tokenizer) -> dict[str, float]:
    """How two tokenizers' vocabularies relate by surface bytes (for docs and tests): sizes, tokens
    with an identical counterpart, and the share of the cloud's tokens the edge has exactly."""
    edge = {b for b in token_bytes(edge_tokenizer) if b}
    cloud = {b for b in token_bytes(cloud_tokenizer) if b}
    shared = edge & cloud
    return {
        "edge_tokens": len(edge),
        "cloud_tokens": len(cloud),
        "shared_tokens": len(shared),
        "cloud_share_in_edge": len(shared) / max(len(cloud), 1),
    }
