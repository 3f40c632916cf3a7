"""Relaxation-based white-box inversion: recover the input text from the activations the data
party sent by optimising a distribution over the vocabulary at every position instead of free
embeddings, so the solution stays on the vocabulary (Song and Raghunathan, "Information Leakage
in Embedding Models", CCS 2020; VFLAIR-LLM's WhiteBoxInversion).

For each received training batch: Z ∈ R^{B×L×V} starts at zero (uniform), the head (known to the
attacker: ``head``) runs on softmax(Z/T)·E, Adam minimises the distance to the received
activations on the real positions, and each position's guess is argmax Z.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from atoll.split.attacks.base import Attack, AttackParams, Guess, Knowledge
from atoll.split.attacks.common import first_rows, freeze, guesses_from_tokens, relaxed_inversion, training_messages


class RelaxationParams(AttackParams):
    head: Literal["pretrained", "trained"] = Field(
        "pretrained", description="knowledge: the public pretrained head's weights, or the data party's trained head (stronger)"
    )
    steps: int = Field(300, gt=0, description="Adam steps per attacked batch")
    lr: float = Field(0.05, gt=0, description="Adam learning rate on the token logits Z")
    temperature: float = Field(0.05, gt=0, description="T of softmax(Z/T): small T makes the relaxed tokens nearly one-hot")
    loss: Literal["mse", "cosine"] = Field("mse", description="distance between head(softmax(Z/T)E) and the received activations")
    batches: int = Field(1, gt=0, description="attack at most this many received training batches per data party")
    rows: int | None = Field(None, gt=0, description="attack at most this many examples of each batch (None: all)")


class RelaxationInversion(Attack):
    name = "relaxation-inversion"
    paper = "Song and Raghunathan, Information Leakage in Embedding Models, CCS 2020 (VFLAIR-LLM's WhiteBoxInversion)"
    summary = "optimise a softmax distribution over the vocabulary per position so the known head reproduces the activations"
    target = "inputs"
    Params = RelaxationParams

    def run(self, transcript, knowledge: Knowledge) -> list[Guess]:
        import torch

        params: RelaxationParams = self.params
        guesses: list[Guess] = []
        for message in training_messages(transcript, "forward", params.batches):
            head = knowledge.data_model(params.head, message.party)
            freeze(head)
            activations = first_rows(message.tensors["activations"], params.rows)
            vocabulary = head.family.word_embeddings().weight.shape[0]
            start = torch.zeros(activations.shape[0], activations.shape[1], vocabulary)
            mask = first_rows(message.tensors["attention_mask"], params.rows)
            logits = relaxed_inversion(head, activations, mask, start, params.steps, params.lr, params.temperature, params.loss)
            guesses += guesses_from_tokens(message, logits.argmax(-1))
        return guesses
