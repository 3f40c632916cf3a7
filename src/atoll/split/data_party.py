"""A data party: holds its examples and labels, the head (and in head-body-tail the tail) of the
model, and its defenses; it drives every exchange with the model party through its channel.

One training step: head forward, protect, send the activations; receive the outputs (head-tail)
or hidden states (head-body-tail, then the tail runs here); compute the loss; return the
gradient of the loss with respect to what it received; receive the gradient with respect to
what it sent and finish the backward pass through the head. Both parties then step their own
AdamW, so with defenses off and clipping off the updates equal those of the unsplit model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from atoll.fl.trainer import TrainPlan, lr_factor
from atoll.seeding import numpy_rng, seed_everything
from atoll.split.channel import Channel
from atoll.split.defenses.base import DefenseStack, Exchange
from atoll.split.partition import Cut
from atoll.split.slices import PartyModel
from atoll.split.tasks import Metrics, SplitData, task_loss


@dataclass
class DataPartySettings:
    party: int
    seed: int
    lr: float
    weight_decay: float
    max_grad_norm: float | None
    planned_steps: int
    batch_size: int
    schedule: str = "constant"
    warmup_steps: int = 0
    group_by_length: bool = True
    facts: dict[str, Any] = field(default_factory=dict)  # what the hello tells the model party
    model_party_steps: int = 1  # the model party's steps over all data parties (its LR schedule)


class DataParty:
    def __init__(
        self,
        settings: DataPartySettings,
        model: PartyModel,
        channel: Channel,
        data: SplitData,
        train_indices: np.ndarray,
        cut: Cut,
        defenses: DefenseStack,
    ):
        self.settings = settings
        self.party = settings.party
        self.model = model
        self.channel = channel
        self.data = data
        self.train_indices = np.asarray(train_indices)
        self.cut = cut
        self.defenses = defenses
        self.kind = data.kind
        self.returns = cut.model_returns
        params = model.parameters() + [p for m in defenses.modules() for p in m.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay) if params else None
        self.plan = TrainPlan(max(1, settings.planned_steps), settings.lr, schedule=settings.schedule, warmup_steps=settings.warmup_steps)
        self._batches: Iterator[dict[str, Tensor]] | None = None
        self.step = 0
        self.batch_log: dict[int, np.ndarray] = {}  # step -> example ids: the truth attacks are scored against
        self._sessions = 0

    # -- protocol -----------------------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        return self.channel.call(
            "hello", {}, {"party": self.party, "planned_steps": self.settings.planned_steps, **self.settings.facts}
        ).meta

    def _meta(self, step: int, phase: str, **extra) -> dict[str, Any]:
        return {"party": self.party, "step": step, "phase": phase, **extra}

    def _train_mode(self, flag: bool) -> None:
        self.model.train(flag)
        for module in self.defenses.modules():
            module.train(flag)

    def _head(self, batch: dict[str, Tensor], step: int, phase: str, cache=None) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """Protected tokens -> embeddings -> head -> protected activations."""
        batch = self.defenses.protect_tokens(batch, step, phase)
        mask = batch["attention_mask"]
        seed_everything(self.settings.seed, "dropout", "data", self.party, step, "head")
        embeddings = self.defenses.protect_embeddings(self.model.embed_tokens(batch["input_ids"]), mask, step, phase)
        activations = self.model.run("head", embeddings, mask, batch.get("token_type_ids"), cache=cache)
        sent = self.defenses.protect_activations(activations, mask, step, phase)
        return batch, embeddings, activations, sent

    def _tail(self, received: Tensor, mask: Tensor, step: int, phase: str, cache=None) -> Tensor:
        back = self.defenses.receive(received, mask, step, phase)
        if self.cut.kind == "head-tail":
            return back
        seed_everything(self.settings.seed, "dropout", "data", self.party, step, "tail")
        return self.model.run("tail", back, mask, cache=cache)

    # -- training ---------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One batch: forward across the cut, loss here, backward across the cut, both parties step."""
        if self._batches is None:
            rng = numpy_rng(self.settings.seed, "split-batches", self.party)
            self._batches = self.data.train_batches(self.train_indices, self.settings.batch_size, rng, self.settings.group_by_length)
        batch = next(self._batches)
        self.step += 1
        step = self.step
        self.batch_log[step] = batch["index"].numpy()
        self._train_mode(True)
        batch, embeddings, activations, sent = self._head(batch, step, "train")
        mask = batch["attention_mask"]
        reply = self.channel.call("forward", {"activations": sent, "attention_mask": mask.bool()}, self._meta(step, "train"))
        received = reply.tensors[self.returns].requires_grad_(True)
        outputs = self._tail(received, mask, step, "train")
        loss = task_loss(self.kind, outputs, batch)
        extra = self.defenses.extra_loss(Exchange(batch, embeddings, activations, sent, received, outputs, step, "train"))
        total = loss + extra if extra is not None else loss
        total.backward(retain_graph=sent.requires_grad)
        gradients = self.defenses.protect_gradients(received.grad, step)
        upstream = sent.requires_grad
        reply = self.channel.call("backward", {"output_gradients": gradients}, self._meta(step, "train", return_gradients=upstream))
        if upstream:
            sent.backward(reply.tensors["activation_gradients"])
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.plan.lr * lr_factor(step - 1, self.plan)
            if self.settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._train_mode(False)
        tokens = int(mask.sum())
        result = {"loss": float(loss.detach()), "examples": float(len(batch["index"])), "tokens": float(tokens)}
        if extra is not None:
            result["defense_loss"] = float(extra.detach())
        return result

    # -- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, batch: dict[str, Tensor], phase: str = "eval") -> Tensor:
        """Task outputs for a batch, across the cut, without training anything."""
        self._train_mode(False)
        batch, _, _, sent = self._head(batch, self.step, phase)
        mask = batch["attention_mask"]
        reply = self.channel.call("forward", {"activations": sent, "attention_mask": mask.bool()}, self._meta(self.step, phase))
        return self._tail(reply.tensors[self.returns], mask, self.step, phase)

    @torch.no_grad()
    def evaluate(self, indices: np.ndarray, batch_size: int, metrics: Metrics) -> dict[str, float]:
        for batch in self.data.eval_batches(indices, batch_size):
            metrics.update(self.infer(batch), batch)
        return metrics.result()

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int,
        eos_id: int | None,
        pad_id: int,
        logits: list[Tensor] | None = None,
    ) -> Tensor:
        """Greedy generation across the cut from left-padded prompts. Both sides keep a KV cache,
        so after the prompt every new token sends one position each way. Each step's next-token
        logits are appended to ``logits`` when a list is given."""
        self._train_mode(False)
        self._sessions += 1
        session = f"{self.party}-{self._sessions}"
        caches = {role: self.model.new_cache(role) for role in self.model.slices}
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        mask = attention_mask
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        generated: list[Tensor] = []
        stage = "prefill"
        try:
            for _ in range(max_new_tokens + 1):
                batch["attention_mask"] = mask
                _, _, _, sent = self._head(batch, self.step, "generate", cache=caches["head"])
                new_mask = batch["attention_mask"][:, -sent.shape[1] :]
                meta = self._meta(self.step, "generate", session=session, stage=stage)
                reply = self.channel.call("generate", {"activations": sent, "attention_mask": new_mask.bool()}, meta)
                outputs = self._tail(reply.tensors[self.returns], mask, self.step, "generate", cache=caches.get("tail"))
                if len(generated) == max_new_tokens:
                    break
                if logits is not None:
                    logits.append(outputs[:, -1].float())
                token = outputs[:, -1].argmax(-1)
                if pad_id is not None:
                    token = torch.where(finished, torch.full_like(token, pad_id), token)
                generated.append(token)
                if eos_id is not None:
                    finished |= token == eos_id
                if bool(finished.all()) or len(generated) == max_new_tokens:
                    break
                stage = "step"
                batch = {"input_ids": token[:, None], "attention_mask": torch.ones_like(token[:, None])}
                mask = torch.cat([mask, batch["attention_mask"]], dim=1)
        finally:
            self.channel.call("generate", {}, {"party": self.party, "session": session, "stage": "end"})
        return torch.stack(generated, dim=1) if generated else input_ids.new_zeros((input_ids.shape[0], 0))
