"""The model party: holds the middle (head-body-tail) or the end (head-tail) of the model, trains
it on whatever data party calls, and never sees tokens or labels.

It answers five kinds of request (see docs/split.md, "The wire"):

============  =====================================  ==========================================
kind          request tensors                        reply tensors
============  =====================================  ==========================================
hello         -                                      -
forward       activations [B,L,d], attention_mask    outputs (head-tail) or hidden (head-body-tail)
backward      output_gradients                       activation_gradients (when asked)
generate      activations [B,q,d], attention_mask    outputs / hidden of the new positions
finish        -                                      -
============  =====================================  ==========================================

Everything it receives passes through its :class:`~atoll.split.transcript.Transcript` first,
which keeps what the record policy selects: the material of the (honest-but-curious) attacks.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from atoll.errors import AtollError
from atoll.fl.trainer import TrainPlan, lr_factor
from atoll.seeding import seed_everything
from atoll.split.channel import ERROR_KIND, SplitProtocolError
from atoll.split.config import SplitConfig
from atoll.split.models import VocabularyFacts, load_task_model
from atoll.split.partition import Cut
from atoll.split.slices import LoRASettings, PartyModel, SliceTuning
from atoll.split.transcript import Received, RecordPolicy, Transcript
from atoll.split.wire import Message, decode, encode, wire_dtype

log = logging.getLogger(__name__)

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def slice_tuning(config: SplitConfig) -> dict[str, SliceTuning]:
    slices = config.split.slices
    return {
        role: SliceTuning(getattr(slices, role).tuning, tuple(getattr(slices, role).trainable_modules)) for role in ("head", "body", "tail")
    }


def lora_settings(config: SplitConfig) -> LoRASettings:
    lora = config.model.lora
    targets = "auto" if lora.target_modules == "auto" else tuple(lora.target_modules)
    return LoRASettings(lora.rank, lora.alpha, lora.dropout, targets, lora.rslora)


def record_policy(config: SplitConfig) -> RecordPolicy:
    from atoll.split.plugins import plugin_class

    every = config.record.every or (1 if config.attacks else 0)
    parameters = config.record.parameters or any(plugin_class("attack", a.name).needs_parameters for a in config.attacks)
    return RecordPolicy(every, config.record.limit, tuple(config.record.phases), parameters, config.record.start)


@dataclass
class _Session:
    cache: Any
    mask: Tensor


@dataclass
class _Pending:
    inputs: Tensor
    outputs: Tensor


@dataclass
class ModelPartyState:
    """What the model party learned from the hellos: the facts every data party must share."""

    facts: dict[str, Any] = field(default_factory=dict)
    parties: set[int] = field(default_factory=set)


class ModelParty:
    """Answers the data parties' requests; see the module docstring for the protocol."""

    def __init__(self, config: SplitConfig, out_dir: Path | None = None):
        self.config = config
        self.out_dir = out_dir
        self.transcript = Transcript(record_policy(config), out_dir)
        self.state = ModelPartyState()
        self.model: PartyModel | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.plan: TrainPlan | None = None
        self.steps = 0
        self.pending: dict[int, _Pending] = {}
        self.sessions: dict[str, _Session] = {}
        self.received_bytes = 0
        self.wire = WIRE_DTYPES[config.split.wire_dtype]
        self.finished = False
        self.kept: Received | None = None  # the message being handled, when the transcript keeps it

    # -- the door ---------------------------------------------------------------------------------
    def handle(self, request: bytes) -> bytes:
        """One request in, one reply out (errors become an ``error`` reply, never an exception)."""
        self.received_bytes += len(request)
        try:
            message = decode(request)
            message.tensors = {k: (v.float() if v.is_floating_point() else v) for k, v in message.tensors.items()}
            handler = getattr(self, f"_on_{message.kind}", None)
            if handler is None:
                raise SplitProtocolError(f"unknown request kind '{message.kind}'")
            self.kept = None
            if message.kind in ("forward", "backward", "generate"):
                phase = "train" if message.kind == "backward" else str(message.meta.get("phase", "train"))
                received = Received(message.kind, dict(message.tensors), dict(message.meta))
                if self.transcript.offer(phase, request, received):
                    received.tensors = {k: v.detach().clone() for k, v in received.tensors.items()}
                    self.kept = received
            reply = handler(message)
        except AtollError as error:
            reply = Message(ERROR_KIND, {}, {"message": error.message, "fix": error.fix})
        except Exception as error:  # a bug here must not kill the server silently: report it back
            log.error("model party failed:\n%s", traceback.format_exc())
            reply = Message(ERROR_KIND, {}, {"message": f"the model party failed: {type(error).__name__}: {error}"})
        reply.tensors = wire_dtype(reply.tensors, self.wire)
        return encode(reply)

    # -- hello: build the slice on first contact -------------------------------------------------
    def _facts(self, meta: dict[str, Any]) -> dict[str, Any]:
        keys = ("model", "partition", "head_blocks", "tail_blocks", "seed", "head", "num_labels", "vocabulary")
        return {k: meta.get(k) for k in keys}

    def expected_facts(self) -> dict[str, Any]:
        split = self.config.split
        return {
            "model": self.config.model.name,
            "partition": split.partition,
            "head_blocks": split.head_blocks,
            "tail_blocks": split.tail_blocks,
            "seed": self.config.seed,
        }

    def _on_hello(self, message: Message) -> Message:
        facts = self._facts(message.meta)
        for key, value in self.expected_facts().items():
            if facts[key] != value:
                raise SplitProtocolError(
                    f"data party {message.meta.get('party')} has {key}={facts[key]!r}, the model party {key}={value!r}",
                    "run both parties with the same model and cut",
                )
        if not self.state.facts:
            self.state.facts = facts
            self._build(facts, int(message.meta.get("planned_steps", 1)))
        elif facts != self.state.facts:
            different = next(k for k in facts if facts[k] != self.state.facts[k])
            raise SplitProtocolError(f"data party {message.meta.get('party')} disagrees with the first data party on {different}")
        self.state.parties.add(int(message.meta.get("party", 0)))
        assert self.model is not None
        return Message("hello", {}, {"model_party": self.model.parameter_counts()})

    def _build(self, facts: dict[str, Any], planned_steps: int) -> None:
        config = self.config
        torch.set_num_threads(config.run.threads)
        vocabulary = VocabularyFacts(**facts["vocabulary"])
        model = load_task_model(config.model.name, facts["head"], facts["num_labels"], vocabulary, config.model.dtype, config.seed)
        from atoll.split.families import family_of

        cut = Cut(config.split.partition, config.split.head_blocks, config.split.tail_blocks, family_of(model, facts["head"]).num_blocks())
        self.cut = cut
        self.role = cut.model_slice().role
        self.model = PartyModel(model, facts["head"], cut.of_party("model"), slice_tuning(config), lora_settings(config), config.seed)
        params = self.model.parameters()
        train = config.train
        if params:
            self.optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        self.plan = TrainPlan(max(1, planned_steps), train.lr, schedule=train.schedule, warmup_steps=train.warmup_steps)

    # -- training ---------------------------------------------------------------------------------
    def _require_model(self) -> PartyModel:
        if self.model is None:
            raise SplitProtocolError("no hello yet: the data party must introduce itself first")
        return self.model

    def _on_forward(self, message: Message) -> Message:
        model = self._require_model()
        party = int(message.meta.get("party", 0))
        training = message.meta.get("phase", "train") == "train"
        inputs = message.tensors["activations"]
        mask = message.tensors["attention_mask"]
        seed_everything(self.config.seed, "dropout", "model", party, int(message.meta.get("step", 0)))
        model.train(training)
        if training:
            if self.kept is not None and self.transcript.policy.parameters:
                self.transcript.add_local(self.kept, {f"parameters.{n}": p for n, p in model.model.named_parameters() if p.requires_grad})
            inputs.requires_grad_(True)
            outputs = model.run(self.role, inputs, mask)
            self.pending[party] = _Pending(inputs, outputs)
        else:
            with torch.no_grad():
                outputs = model.run(self.role, inputs, mask)
        if self.kept is not None:
            self.transcript.add_local(self.kept, {"outputs": outputs})
        return Message("forward", {self.cut.model_returns: outputs.detach()})

    def _on_backward(self, message: Message) -> Message:
        model = self._require_model()
        party = int(message.meta.get("party", 0))
        pending = self.pending.pop(party, None)
        if pending is None:
            raise SplitProtocolError(f"backward from data party {party} without a training forward before it")
        gradients = message.tensors["output_gradients"]
        if gradients.shape != pending.outputs.shape:
            raise SplitProtocolError(f"output_gradients have shape {tuple(gradients.shape)}, the outputs {tuple(pending.outputs.shape)}")
        pending.outputs.backward(gradients)
        if self.kept is not None:
            named = {f"parameter_gradients.{n}": p.grad for n, p in model.model.named_parameters() if p.grad is not None}
            self.transcript.add_local(self.kept, named)
        if self.optimizer is not None and self.plan is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.plan.lr * lr_factor(self.steps, self.plan)
            if self.config.train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.train.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        tensors = {}
        if message.meta.get("return_gradients", True):
            tensors["activation_gradients"] = pending.inputs.grad.detach()
        return Message("backward", tensors)

    # -- generation with a KV cache ---------------------------------------------------------------
    def _on_generate(self, message: Message) -> Message:
        model = self._require_model()
        session_id = str(message.meta.get("session"))
        stage = message.meta.get("stage")
        if stage == "end":
            self.sessions.pop(session_id, None)
            return Message("generate")
        inputs = message.tensors["activations"]
        new_mask = message.tensors["attention_mask"]
        if stage == "prefill":
            session = self.sessions[session_id] = _Session(model.new_cache(self.role), new_mask)
        else:
            session = self.sessions.get(session_id)
            if session is None:
                raise SplitProtocolError(f"unknown generation session '{session_id}'")
            session.mask = torch.cat([session.mask, new_mask], dim=1)
        model.train(False)
        with torch.no_grad():
            outputs = model.run(self.role, inputs, session.mask, cache=session.cache)
        if stage == "prefill" and self.cut.kind == "head-tail":
            outputs = outputs[:, -1:]  # only the last position's logits pick the next token
        return Message("generate", {self.cut.model_returns: outputs})

    # -- the end ----------------------------------------------------------------------------------
    def _on_finish(self, message: Message) -> Message:
        written: list[str] = []
        if self.out_dir is not None and self.model is not None:
            written = self.model.save(self.out_dir)
        self.finished = True
        counts = self.model.parameter_counts() if self.model is not None else {}
        return Message(
            "finish",
            {},
            {
                "written": written,
                "steps": self.steps,
                "received_bytes": self.received_bytes,
                "recorded": len(self.transcript.messages),
                **counts,
            },
        )
