"""Batch-level label inference (head-body-tail): the model party recovers a batch's labels by
finding the labels whose gradient on its own (body) parameters matches the one it observed
(Zou, Liu, Huang, Shi and others, "Defending Batch-Level Label Inference and Replacement
Attacks in Vertical Federated Learning", IEEE Transactions on Big Data 2022; the gradient-
matching label attack of VFLAIR-LLM, after DLG: Zhu, Liu and Han, NeurIPS 2019).

For each recorded training step: the body, restored to the parameters it had at that step (the
model party's own, recorded with the message), runs on the received activations; the data
party's tail as the attacker knows it (``tail``: pretrained or trained) runs on the result; dummy
label logits Y are optimised with Adam so that the gradient of the cross-entropy with soft labels
softmax(Y) on the body's trainable parameters equals the observed one (squared L2). The guess
is argmax Y. The loss form (mean cross-entropy over the batch) is public protocol knowledge.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from atoll.split.attacks.base import Attack, AttackParams, Guess, Knowledge
from atoll.split.attacks.common import freeze, matching_message, training_messages, twice_differentiable


class LabelInferenceParams(AttackParams):
    tail: Literal["pretrained", "trained"] = Field(
        "pretrained", description="knowledge: the public pretrained tail, or the data party's trained tail (stronger)"
    )
    steps: int = Field(200, gt=0, description="Adam steps per attacked batch")
    lr: float = Field(0.05, gt=0, description="Adam learning rate on the dummy label logits")
    batches: int = Field(2, gt=0, description="attack at most this many recorded training batches per data party")


class BatchLabelInference(Attack):
    name = "batch-label-inference"
    paper = "Zou et al., Defending Batch-Level Label Inference and Replacement Attacks in VFL, IEEE TBD 2022 (gradient matching as DLG, NeurIPS 2019)"
    summary = "find the labels whose gradient on the body's parameters matches the observed one (head-body-tail)"
    target = "labels"
    Params = LabelInferenceParams
    needs_parameters = True

    @classmethod
    def check(cls, params, partition: str, head_kind: str) -> None:
        from atoll.errors import ConfigError

        if partition != "head-body-tail" or head_kind != "classification":
            raise ConfigError(
                "attack batch-label-inference needs split.partition=head-body-tail and a classification task",
                "the model party must hold the body and the data party the labels' tail",
            )

    def run(self, transcript, knowledge: Knowledge) -> list[Guess]:
        import torch
        from torch.nn import functional as F

        params: LabelInferenceParams = self.params
        guesses: list[Guess] = []
        body = knowledge.own_model()
        twice_differentiable(body)
        names = [n for n, p in body.model.named_parameters() if p.requires_grad]
        if not names:
            return guesses  # a frozen body has no parameter gradients to match
        for backward in training_messages(transcript, "backward", params.batches):
            forward = matching_message(transcript, "forward", backward.party, backward.step)
            observed = {n: backward.local.get(f"parameter_gradients.{n}") for n in names}
            if forward is None or any(v is None for v in observed.values()):
                continue
            missing = [n for n in names if f"parameters.{n}" not in forward.local]
            if missing:
                raise RuntimeError(f"the transcript lacks the model party's parameter '{missing[0]}' at step {forward.step}")
            state = dict(body.model.named_parameters())
            with torch.no_grad():
                for name in names:
                    state[name].copy_(forward.local[f"parameters.{name}"])
            body.train(False)
            tail = knowledge.data_model(params.tail, backward.party)
            freeze(tail)
            twice_differentiable(tail)
            mask = forward.tensors["attention_mask"]
            hidden = body.run("body", forward.tensors["activations"].float(), mask)
            trainable = [state[n] for n in names]
            targets = [observed[n].float() for n in names]
            batch = hidden.shape[0]
            dummy = torch.zeros(batch, self._classes(tail, hidden, mask), requires_grad=True)
            optimizer = torch.optim.Adam([dummy], lr=params.lr)
            for _ in range(params.steps):
                optimizer.zero_grad(set_to_none=True)
                point = hidden.detach().requires_grad_(True)
                logits = tail.run("tail", point, mask).float()
                loss = -(torch.softmax(dummy, -1) * F.log_softmax(logits, -1)).sum(-1).mean()
                (upstream,) = torch.autograd.grad(loss, point, create_graph=True)
                gradients = torch.autograd.grad(hidden, trainable, grad_outputs=upstream, create_graph=True, retain_graph=True)
                distance = sum(((g - t) ** 2).sum() for g, t in zip(gradients, targets))
                (dummy.grad,) = torch.autograd.grad(distance, dummy, retain_graph=True)  # keep the body's graph
                optimizer.step()
            for row, label in enumerate(dummy.detach().argmax(-1).tolist()):
                guesses.append(Guess(backward.party, backward.step, row, label=label))
        return guesses

    @staticmethod
    def _classes(tail, hidden, mask) -> int:
        import torch

        with torch.no_grad():
            return int(tail.run("tail", hidden[:1].detach(), mask[:1]).shape[-1])
