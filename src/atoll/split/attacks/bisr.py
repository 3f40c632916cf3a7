"""BiSR, bidirectional semi-white-box reconstruction: a learned inverter gives a first guess of the
input text, a backward phase refines it by matching the gradients the data party returned, and a
forward phase by matching the activations it sent (Chen, Xu, Wang, Zhou, Xu and Huang, "Unveiling
the Vulnerability of Private Fine-Tuning in Split-Based Frameworks for Large Language Models: A
Bidirectionally Enhanced Attack", CCS 2024; VFLAIR-LLM's BiSR, which has the forward phase only).

Semi-white-box: the attacker knows the pretrained weights (``head``, ``tail``), not the data
party's fine-tuned ones, and has ``auxiliary`` examples of the same distribution.

1. Inverter (the paper's learning-based SIP): an MLP from each position's activation to the
   embedding space, decoded against the known embedding table, trained on the auxiliary examples
   run through the pretrained head; Gaussian noise of a scale drawn from ``noise_scales`` is added
   in training so it tolerates noisy activations (the paper's noise-adaptive mixture of experts
   is reduced to this augmentation).
2. Backward phase (generative tasks: the labels are the input shifted by one): soft labels
   softmax(Z) per position, initialised from the inverter, are optimised so that the gradient of
   the causal-LM loss with respect to what the model party returned equals the gradient it got
   back (β·L2² + (1−β)·L1). In head-tail the model party returned the logits, so the loss is on
   its own recorded outputs; in head-body-tail it returned hidden states, and the attacker runs
   the pretrained tail on them. On classification the gradient carries the class, not the text,
   and this phase is skipped.
3. Forward phase: from that estimate, relaxation-based inversion (Song and Raghunathan) matches
   the received activations with the pretrained head. The guess is argmax Z.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from atoll.split.attacks.base import Attack, AttackParams, Guess, Knowledge
from atoll.split.attacks.common import (
    first_rows,
    freeze,
    guesses_from_tokens,
    matching_message,
    relaxed_inversion,
    training_messages,
    twice_differentiable,
)


class BiSRParams(AttackParams):
    head: Literal["pretrained", "trained"] = Field("pretrained", description="knowledge: the head's weights (semi-white-box: pretrained)")
    tail: Literal["pretrained", "trained"] = Field(
        "pretrained", description="knowledge (head-body-tail): the tail's weights for the backward phase"
    )
    auxiliary: int = Field(256, gt=0, description="knowledge: same-distribution examples to train the inverter on")
    inverter_epochs: int = Field(6, ge=0, description="passes over the auxiliary examples")
    inverter_lr: float = Field(2e-3, gt=0, description="AdamW learning rate of the inverter")
    noise_scales: list[float] = Field(
        default_factory=lambda: [0.0], description="std of Gaussian noise added to activations when training the inverter"
    )
    backward_steps: int = Field(100, ge=0, description="Adam steps of the gradient-matching phase (0: skip)")
    forward_steps: int = Field(100, ge=0, description="Adam steps of the activation-matching phase (0: skip)")
    lr: float = Field(0.05, gt=0, description="Adam learning rate of both matching phases")
    temperature: float = Field(0.05, gt=0, description="T of softmax(Z/T) in the forward phase")
    beta: float = Field(0.85, ge=0, le=1, description="backward phase: weight of L2 against L1 in the gradient distance")
    batches: int = Field(1, gt=0, description="attack at most this many received training batches per data party")
    rows: int | None = Field(None, gt=0, description="attack at most this many examples of each batch (None: all)")


class BiSR(Attack):
    name = "bisr"
    paper = "Chen et al., Unveiling the Vulnerability of Private Fine-Tuning in Split-Based Frameworks for LLMs: A Bidirectionally Enhanced Attack (BiSR), CCS 2024"
    summary = "learned inverter, then gradient matching on the returned gradients, then activation matching on the sent activations"
    target = "inputs"
    Params = BiSRParams

    def run(self, transcript, knowledge: Knowledge) -> list[Guess]:
        import torch

        params: BiSRParams = self.params
        messages = training_messages(transcript, "forward", params.batches)
        if not messages:
            return []
        head = knowledge.data_model(params.head, messages[0].party)
        freeze(head)
        table = head.family.word_embeddings().weight.detach()
        inverter = self.train_inverter(head, knowledge.auxiliary(params.auxiliary), table) if params.inverter_epochs else None
        guesses: list[Guess] = []
        for message in messages:
            head = knowledge.data_model(params.head, message.party)
            freeze(head)
            activations = first_rows(message.tensors["activations"], params.rows).float()
            mask = first_rows(message.tensors["attention_mask"], params.rows)
            if inverter is not None:
                with torch.no_grad():
                    logits = inverter(activations)
            else:
                logits = torch.zeros(*activations.shape[:2], table.shape[0])
            backward = matching_message(transcript, "backward", message.party, message.step)
            if params.backward_steps and backward is not None and head.family.head == "causal-lm":
                logits = self.match_gradients(message, backward, logits, knowledge)
            if params.forward_steps:
                # the inverter's logits are log-probabilities: scale them to the temperature of the relaxation
                start = torch.log_softmax(logits, -1) * params.temperature
                logits = relaxed_inversion(head, activations, mask, start, params.forward_steps, params.lr, params.temperature)
            guesses += guesses_from_tokens(message, logits.argmax(-1))
        return guesses

    # -- 1. the learned inverter ------------------------------------------------------------------
    def train_inverter(self, head, batches, table):
        import torch
        from torch import nn
        from torch.nn import functional as F

        from atoll.seeding import torch_generator

        params: BiSRParams = self.params
        dim = table.shape[1]
        generator = torch_generator(self.seed, self.name, "inverter")

        class Inverter(nn.Module):
            def __init__(self):
                super().__init__()
                self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
                self.scale = nn.Parameter(torch.tensor(20.0))

            def forward(self, hidden):
                return self.scale * F.normalize(self.mlp(hidden), dim=-1) @ F.normalize(table, dim=-1).T

        inverter = Inverter()
        examples = []
        with torch.no_grad():
            for batch in batches:
                mask = batch["attention_mask"]
                hidden = head.run("head", head.embed_tokens(batch["input_ids"]), mask, batch.get("token_type_ids"))
                examples.append((hidden, batch["input_ids"], mask.bool()))
        optimizer = torch.optim.AdamW(inverter.parameters(), lr=params.inverter_lr)
        for _ in range(params.inverter_epochs):
            for hidden, ids, keep in examples:
                scale = params.noise_scales[int(torch.randint(len(params.noise_scales), (1,), generator=generator))]
                noisy = hidden + scale * torch.randn(hidden.shape, generator=generator) if scale else hidden
                loss = F.cross_entropy(inverter(noisy[keep]), ids[keep])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        inverter.train(False)
        for param in inverter.parameters():
            param.requires_grad_(False)
        return inverter

    # -- 2. gradient matching ----------------------------------------------------------------------
    def match_gradients(self, forward, backward, logits, knowledge: Knowledge):
        """Refine per-position token logits so the causal-LM loss they imply as labels reproduces
        the gradient the data party returned for what the model party sent back."""
        import torch
        from torch.nn import functional as F

        params: BiSRParams = self.params
        returned = forward.local.get("outputs")
        observed = backward.tensors["output_gradients"].float()
        if returned is None:
            return logits
        rows = params.rows
        mask = forward.tensors["attention_mask"]
        if returned.shape[-1] == logits.shape[-1]:  # head-tail: the model party returned the logits itself
            top = None
        else:  # head-body-tail: the data party's tail, as the attacker knows it
            top = knowledge.data_model(params.tail, forward.party)
            freeze(top)
            twice_differentiable(top)
        # positions that carried a label: a nonzero returned gradient (head-tail), else every real position but the last
        carried = observed.reshape(*observed.shape[:2], -1).abs().sum(-1) > 0
        labelled = carried[:, :-1] if top is None else mask.bool()[:, :-1]
        count = max(int(labelled.sum()), 1)  # the loss is a mean over the whole batch's labels
        returned, observed = first_rows(returned, rows).float(), first_rows(observed, rows)
        mask, labelled = first_rows(mask, rows), first_rows(labelled, rows)
        z = logits.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=params.lr)
        for _ in range(params.backward_steps):
            optimizer.zero_grad(set_to_none=True)
            point = returned.detach().requires_grad_(True)
            predicted = point if top is None else top.run("tail", point, mask).float()
            soft = torch.softmax(z[:, 1:], -1)  # the label of position t is the token at t + 1
            loss = -(soft * F.log_softmax(predicted[:, :-1], -1)).sum(-1)[labelled].sum() / count
            (gradient,) = torch.autograd.grad(loss, point, create_graph=True)
            difference = gradient - observed
            distance = params.beta * difference.pow(2).sum() + (1 - params.beta) * difference.abs().sum()
            distance.backward()
            optimizer.step()
        return z.detach()
