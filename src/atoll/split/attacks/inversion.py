"""Vanilla white-box model inversion: recover the input text from the activations the data party
sent, knowing the head's weights.

For each received batch A (activations at the cut, with its attention mask), optimise word
embeddings Z with Adam so that head(Z) matches A on the real positions (mean squared error,
or 1 - cosine), then read each position's token as the vocabulary row most cosine-similar to Z.
This is the regularised-MLE white-box attack on collaborative inference of He, Zhang and Lee
("Model Inversion Attacks against Collaborative Inference", ACSAC 2019), the attack VFLAIR-LLM
calls VMI-whitebox (after Fredrikson et al., CCS 2015), with embeddings started at zero as there.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from atoll.split.attacks.base import Attack, AttackParams, Guess, Knowledge
from atoll.split.attacks.common import first_rows, guesses_from_tokens


class WhiteBoxInversionParams(AttackParams):
    head: Literal["pretrained", "trained"] = Field(
        "pretrained", description="knowledge: the public pretrained head's weights, or the data party's trained head (stronger)"
    )
    steps: int = Field(200, gt=0, description="Adam steps per attacked batch")
    lr: float = Field(0.05, gt=0, description="Adam learning rate on the embeddings")
    loss: Literal["mse", "cosine"] = Field("mse", description="distance between head(Z) and the received activations")
    batches: int = Field(2, gt=0, description="attack at most this many received training batches per data party")
    rows: int | None = Field(None, gt=0, description="attack at most this many examples of each batch (None: all)")


class WhiteBoxInversion(Attack):
    name = "white-box-inversion"
    paper = "He, Zhang and Lee, ACSAC 2019 (VFLAIR-LLM's VMI-whitebox, after Fredrikson et al., CCS 2015)"
    summary = "optimise input embeddings so the known head reproduces the received activations; nearest tokens by cosine"
    target = "inputs"
    Params = WhiteBoxInversionParams

    def run(self, transcript, knowledge: Knowledge) -> list[Guess]:
        params: WhiteBoxInversionParams = self.params
        guesses: list[Guess] = []
        per_party: dict[int, int] = {}
        for message in transcript.of_kind("forward"):
            if message.meta.get("phase") != "train":
                continue
            if per_party.get(message.party, 0) >= params.batches:
                continue
            per_party[message.party] = per_party.get(message.party, 0) + 1
            head = knowledge.data_model(params.head, message.party)
            rows = params.rows
            tokens = self.invert(
                head, first_rows(message.tensors["activations"], rows), first_rows(message.tensors["attention_mask"], rows)
            )
            guesses += guesses_from_tokens(message, tokens)
        return guesses

    def invert(self, head, activations, mask):
        """Token ids [B, L] whose head activations best match ``activations``."""
        import torch
        from torch.nn import functional as F

        params: WhiteBoxInversionParams = self.params
        head.train(False)
        for param in head.model.parameters():
            param.requires_grad_(False)
        table = head.family.word_embeddings().weight.detach()
        keep = mask.bool().unsqueeze(-1).float()
        target = activations.detach().float()
        dummy = torch.zeros(activations.shape[0], activations.shape[1], table.shape[1], requires_grad=True)
        optimizer = torch.optim.Adam([dummy], lr=params.lr)
        for _ in range(params.steps):
            optimizer.zero_grad(set_to_none=True)
            predicted = head.run("head", dummy, mask)
            if params.loss == "mse":
                loss = ((predicted - target).pow(2) * keep).sum() / (keep.sum() * target.shape[-1])
            else:
                loss = ((1 - F.cosine_similarity(predicted, target, dim=-1)) * keep.squeeze(-1)).sum() / keep.sum()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            similarity = F.normalize(dummy, dim=-1) @ F.normalize(table, dim=-1).T
            return similarity.argmax(-1)
