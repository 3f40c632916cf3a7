"""The one live model of a process: a frozen base with PEFT LoRA adapters (one per rank in use).

A client is data plus small private tensors; to train or evaluate it the runner loads the client's
:class:`AdapterState` into the workbench (a few tensor copies), runs, and reads the result back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from atoll.config import LoRAConfig
from atoll.data.batching import training_batches
from atoll.data.tasks import TaskSpec, Tokenized
from atoll.fl.state import AdapterState
from atoll.fl.trainer import TrainPlan, chain, evaluate_model, train_steps
from atoll.models.adapters import BaseWeights, LiveAdapter, adapter_name
from atoll.seeding import numpy_rng, seed_everything


@dataclass(frozen=True)
class Trainable:
    """Which parts of the adapter an algorithm trains (FFA-LoRA freezes A, RoLoRA alternates)."""

    lora_A: bool = True
    lora_B: bool = True
    extra: bool = True


class Workbench:
    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        spec: TaskSpec,
        data: Tokenized,
        lora: LoRAConfig,
        targets: list[str],
        seed: int,
        eval_batch_size: int = 64,
        max_new_tokens: int = 64,
    ):
        from peft import LoraConfig, TaskType, get_peft_model

        self.tokenizer = tokenizer
        self.spec = spec
        self.data = data
        self.lora = lora
        self.targets = targets
        self.seed = seed
        self.pad_id = int(tokenizer.pad_token_id)
        self.eval_batch_size = eval_batch_size
        self.max_new_tokens = max_new_tokens
        self.max_trained_parameters = 0
        # hooks of the run's protection stages for the client training now (set by the federation)
        self.stage_hooks: list = []
        self._task_type = TaskType.CAUSAL_LM if spec.is_generative else TaskType.SEQ_CLS
        self._peft_config = lambda rank: LoraConfig(
            task_type=self._task_type,
            r=rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(targets),
            use_rslora=lora.rslora,
            modules_to_save=list(lora.trainable_modules) or None,
        )
        for param in model.parameters():
            param.requires_grad_(False)
        seed_everything(seed, "adapter-init", lora.rank)
        self.model = get_peft_model(model, self._peft_config(lora.rank))
        self.model.eval()
        self._adapters: dict[int, LiveAdapter] = {lora.rank: LiveAdapter(self.model, "default")}
        self._initial: dict[int, AdapterState] = {lora.rank: self._adapters[lora.rank].read()}
        self.base = BaseWeights(self.model)
        self.active: LiveAdapter = self._adapters[lora.rank]

    # -- adapters --------------------------------------------------------------------------------
    def adapter(self, rank: int) -> LiveAdapter:
        """The live adapter of ``rank`` (created, with a seeded init, on first use)."""
        if rank not in self._adapters:
            name = adapter_name(rank, self.lora.rank)
            seed_everything(self.seed, "adapter-init", rank)
            self.model.add_adapter(name, self._peft_config(rank))
            live = LiveAdapter(self.model, name)
            # the head of a new adapter starts equal to the default adapter's initial head
            live.write(AdapterState(extra=self._initial[self.lora.rank].extra), strict=False)
            self._adapters[rank] = live
            self._initial[rank] = live.read()
        return self._adapters[rank]

    def initial_state(self, rank: int | None = None) -> AdapterState:
        """The seeded initial adapter of ``rank`` (same in every process with the same seed)."""
        rank = self.lora.rank if rank is None else rank
        self.adapter(rank)
        return self._initial[rank].clone()

    def activate(self, rank: int) -> LiveAdapter:
        live = self.adapter(rank)
        if live is not self.active:
            self.model.set_adapter(live.name)
            self.active = live
        return live

    def load(self, state: AdapterState) -> LiveAdapter:
        """Make ``state`` the live adapter (its rank's adapter becomes active)."""
        live = self.activate(state.rank() or self.lora.rank)
        live.write(state)
        self.base.apply(state.base)
        return live

    def read(self) -> AdapterState:
        return self.active.read()

    # -- work ------------------------------------------------------------------------------------
    def train(
        self,
        indices: np.ndarray,
        plan: TrainPlan,
        batch_size: int,
        rng_keys: tuple,
        trainable: Trainable = Trainable(),
        group_by_length: bool = True,
    ) -> dict[str, float]:
        """Train the live adapter on ``indices`` of the shared data; randomness from ``rng_keys``."""
        live = self.active
        chosen = set(map(id, live.parameters(trainable.lora_A, trainable.lora_B, trainable.extra)))
        params = []
        for param in live.all_parameters():
            param.requires_grad_(id(param) in chosen)
            if id(param) in chosen:
                params.append(param)
        seed_everything(self.seed, "dropout", *rng_keys)
        batches = training_batches(
            self.data, indices, batch_size, self.pad_id, self.spec.kind, numpy_rng(self.seed, "batches", *rng_keys), group_by_length
        )
        self.note_trained(params)
        try:
            return train_steps(self.model, params, batches, self.with_stage_hooks(plan))
        finally:
            for param in live.all_parameters():
                param.requires_grad_(True)

    def with_stage_hooks(self, plan: TrainPlan) -> TrainPlan:
        """``plan`` with the protection stages' training hooks chained after the algorithm's."""
        if not self.stage_hooks:
            return plan
        return dataclasses.replace(plan, hooks=chain(plan.hooks, self.stage_hooks))

    def note_trained(self, params: list) -> None:
        """Remember the largest parameter set one local training call optimized (for the summary)."""
        self.max_trained_parameters = max(self.max_trained_parameters, sum(p.numel() for p in params))

    def evaluate(self, indices: np.ndarray, max_generate: int = 0) -> dict[str, float]:
        return evaluate_model(
            self.model,
            self.spec,
            self.data,
            indices,
            self.pad_id,
            self.eval_batch_size,
            tokenizer=self.tokenizer,
            max_generate=max_generate,
            max_new_tokens=self.max_new_tokens,
        )

    def save_peft(self, state: AdapterState, directory: Path) -> None:
        """Write ``state`` in PEFT format (loads with ``PeftModel.from_pretrained``)."""
        live = self.load(state)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory), selected_adapters=[live.name])
        if live.name != "default":  # PEFT nests non-default adapters in a sub-folder
            nested = directory / live.name
            for path in nested.iterdir():
                path.replace(directory / path.name)
            nested.rmdir()

    def trainable_parameter_count(self) -> int:
        """Parameters one client trains: the largest set a local training call optimized so far
        (frozen factors excluded, branch adapters and routers included), else the live adapter."""
        return self.max_trained_parameters or sum(p.numel() for p in self.active.all_parameters())

    @torch.no_grad()
    def base_parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) - sum(a.nbytes() // 4 for a in self._adapters.values())
