"""The defense seam: every protection acts at the data party, at the channel boundary, so the
model party never receives an unprotected tensor.

A defense overrides only the hooks it needs. In one training step of a data party they run in
this order (``phase`` is "train", "eval" or "generate"; inference is protected too):

1. ``protect_tokens(batch)``: text level, before the head (SanText, CusText, RanText replace words).
2. ``protect_embeddings(embeddings, mask)``: on the head's word embeddings (d_χ-privacy).
3. the head runs; ``protect_activations(activations, mask)`` transforms what is sent
   (Gaussian/Laplace noise, MID's bottleneck, TextObfuscator, Split-and-Denoise's noise).
4. the model party answers; ``receive(received, mask)`` transforms what came back before the
   data party uses it (Split-and-Denoise's denoiser, a mapping on the tail's input).
5. the loss: the task loss plus every ``extra_loss(exchange)`` (NoPeek's distance correlation,
   MID's KL term, adversarial training's adversary loss, TextObfuscator's cluster loss).
6. ``protect_gradients(gradients)`` transforms the gradient the data party returns to the model
   party (DP on gradients, sparsification; label protection).

Trainable parts (a bottleneck, a mapping, a denoiser, an imagined adversary) are returned by
``modules()``; the data party's optimizer trains them with its own parameters. ``report()``
adds numbers to every metrics record (for example ε spent so far, composed over all releases).

Module rule: import torch inside functions, not at module level, so that checking a config that
names a defense stays fast (tests/split/test_config.py enforces it for every registered defense).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from torch import Tensor, nn


class DefenseParams(BaseModel):
    """Base of a defense's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class DefenseContext:
    """What a defense may know when it is built: everything the data party itself knows."""

    party: int
    seed: int
    partition: str  # "head-tail" or "head-body-tail"
    head_kind: str  # "classification", "question-answering", "causal-lm"
    hidden_size: int
    num_labels: int
    word_embeddings: "Tensor"  # the head's embedding table [vocab, d] (a detached copy)
    tokenizer: Any = None
    # token id -> count in this data party's own training text (an int array of the vocabulary's
    # size), computed on first call; for defenses that need the corpus vocabulary or word rarity
    token_counts: Callable[[], Any] | None = None
    # the token ids of this data party's own training examples (a list of int arrays), read on
    # first call; for the text-level defenses' corpus vocabulary of words
    corpus: Callable[[], list[Any]] | None = None


@dataclass
class Exchange:
    """One forward exchange as the data party saw it, for loss terms."""

    batch: dict[str, "Tensor"]
    embeddings: "Tensor"  # word embeddings after protect_embeddings
    activations: "Tensor"  # the head's output before protect_activations
    sent: "Tensor"  # what went on the wire
    received: "Tensor"  # what came back (a leaf that requires grad in training)
    outputs: "Tensor"  # the task outputs the loss is computed from
    step: int
    phase: str


class Defense:
    """Base class: every hook is the identity; subclasses override what they protect."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Params: ClassVar[type[DefenseParams]] = DefenseParams

    def __init__(self, params: DefenseParams, context: DefenseContext):
        self.params = params
        self.context = context

    def modules(self) -> list["nn.Module"]:
        return []

    def protect_tokens(self, batch: dict[str, "Tensor"], step: int, phase: str) -> dict[str, "Tensor"]:
        return batch

    def protect_embeddings(self, embeddings: "Tensor", mask: "Tensor", step: int, phase: str) -> "Tensor":
        return embeddings

    def protect_activations(self, activations: "Tensor", mask: "Tensor", step: int, phase: str) -> "Tensor":
        return activations

    def receive(self, received: "Tensor", mask: "Tensor", step: int, phase: str) -> "Tensor":
        return received

    def protect_gradients(self, gradients: "Tensor", step: int) -> "Tensor":
        return gradients

    def extra_loss(self, exchange: Exchange) -> "Tensor | None":
        return None

    def report(self) -> dict[str, float]:
        return {}


class DefenseStack(Defense):
    """Several defenses applied in config order (the reverse order on the way back)."""

    name = "stack"

    def __init__(self, defenses: list[Defense]):
        self.defenses = defenses

    def modules(self) -> list["nn.Module"]:
        return [m for d in self.defenses for m in d.modules()]

    def protect_tokens(self, batch, step, phase):
        for defense in self.defenses:
            batch = defense.protect_tokens(batch, step, phase)
        return batch

    def protect_embeddings(self, embeddings, mask, step, phase):
        for defense in self.defenses:
            embeddings = defense.protect_embeddings(embeddings, mask, step, phase)
        return embeddings

    def protect_activations(self, activations, mask, step, phase):
        for defense in self.defenses:
            activations = defense.protect_activations(activations, mask, step, phase)
        return activations

    def receive(self, received, mask, step, phase):
        for defense in reversed(self.defenses):
            received = defense.receive(received, mask, step, phase)
        return received

    def protect_gradients(self, gradients, step):
        for defense in reversed(self.defenses):
            gradients = defense.protect_gradients(gradients, step)
        return gradients

    def extra_loss(self, exchange):
        terms = [t for d in self.defenses if (t := d.extra_loss(exchange)) is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def report(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for defense in self.defenses:
            merged.update({f"{defense.name}.{k}": v for k, v in defense.report().items()})
        return merged

    def __bool__(self) -> bool:
        return bool(self.defenses)
