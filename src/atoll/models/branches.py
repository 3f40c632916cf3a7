"""Extra adapter branches beside PEFT's live adapter, each with a gate (FedDPA, FedLEASE, RAVAN).

On every LoRA layer of the live model the host computes

    y = W0 x + g_primary(x) * s B A x  +  sum_e g_e(x) * branch_e(x)

where ``s B A`` is PEFT's active adapter (the *primary*) and each branch is a small module from
this package: an extra LoRA adapter (:class:`LoRABranch`), a RAVAN multi-head adapter, ... A gate
is a scalar, one weight per example ``(batch,)`` or one per token ``(batch, tokens)`` (a router
looking at the layer input). Branches with no gate are not computed; a missing primary gate is 1.

The host is installed once per live model (from ``BaseServer.prepare_workbench``) and acts only
inside ``with host.engaged(gating):``. Outside, every hook returns at once, so code that knows
nothing of it (the global evaluator, PEFT export, other algorithms) sees the plain PEFT model.
Branch tensors are created on the device of the layer they serve and live outside the model's
module tree: they never enter the model's state dict or a PEFT export.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atoll.config import Config, LoRAConfig
from atoll.data.batching import training_batches
from atoll.errors import UpdateError
from atoll.fl.state import LoRAFactors
from atoll.fl.trainer import TrainPlan, train_steps
from atoll.models.adapters import is_lora_layer, module_name
from atoll.seeding import numpy_rng, seed_everything, torch_generator

PRIMARY = "primary"


def lora_scale(lora: LoRAConfig, rank: int) -> float:
    """PEFT's scaling for ``rank``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return lora.alpha / math.sqrt(rank) if lora.rslora else lora.alpha / rank


def _expand(gate: Tensor | float, like: Tensor) -> Tensor | float:
    """A gate of shape (batch,) or (batch, tokens) broadcast against an output (batch, tokens, d)."""
    if not isinstance(gate, Tensor):
        return gate
    gate = gate.to(like.dtype)
    return gate.reshape(tuple(gate.shape) + (1,) * (like.dim() - gate.dim()))


def _is_off(gate: Tensor | float) -> bool:
    if isinstance(gate, Tensor):
        return not bool(torch.any(gate))
    return gate == 0


# -- gates -----------------------------------------------------------------------------------------


class Gating:
    """Decides the gates of a forward pass: ``gates(layer, x)`` returns {branch or PRIMARY: gate}."""

    def gates(self, layer: str, x: Tensor) -> dict[str, Tensor | float]:
        raise NotImplementedError

    def before_forward(self, host: "BranchHost", args: tuple, kwargs: dict) -> None:
        """Called with the model's inputs before each forward of the whole model (per-example
        gates that depend on the input are computed here). Default: nothing."""


class FixedGates(Gating):
    """The same weight for every example and token, e.g. {PRIMARY: 0.5, "local": 0.5}."""

    def __init__(self, weights: dict[str, float]):
        self.weights = dict(weights)

    def gates(self, layer: str, x: Tensor) -> dict[str, Tensor | float]:
        return self.weights


class ExampleGates(Gating):
    """One weight per example for each named branch (tensors of shape (batch,)), set by the caller
    (or by a subclass in :meth:`before_forward`) before the forward."""

    def __init__(self, weights: dict[str, Tensor | float] | None = None):
        self.weights: dict[str, Tensor | float] = dict(weights or {})

    def gates(self, layer: str, x: Tensor) -> dict[str, Tensor | float]:
        return self.weights


# -- branches --------------------------------------------------------------------------------------


class Branch(nn.Module):
    """An extra adapter on one linear layer. ``forward(x, training)`` returns its scaled output.
    Its parameters are created with ``requires_grad=False``: only :func:`train_parameters` turns
    gradients on, for the tensors being trained."""

    def forward(self, x: Tensor, training: bool) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def tensors(self) -> dict[str, nn.Parameter]:
        """The branch's named trainable tensors (what is read, written and federated)."""
        return dict(self.named_parameters())

    def delta_weight(self) -> Tensor:  # pragma: no cover - abstract
        """The dense update (out_features x in_features) this branch adds to the layer."""
        raise NotImplementedError


class LoRABranch(Branch):
    """A second LoRA adapter on a layer: scale * B (A dropout(x)), A: r x k, B: d x r (B starts at 0)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, dropout: float, device, generator: torch.Generator):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # PEFT's kaiming_uniform(a=sqrt(5)) bound
        A = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        self.A = nn.Parameter(A.to(device), requires_grad=False)
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device), requires_grad=False)
        self.scale = float(scale)
        self.dropout = float(dropout)

    def forward(self, x: Tensor, training: bool) -> Tensor:
        x = x.to(self.A.dtype)
        if self.dropout:
            x = F.dropout(x, self.dropout, training)
        return self.scale * F.linear(F.linear(x, self.A), self.B)

    def factors(self) -> LoRAFactors:
        return LoRAFactors(self.A.detach().clone(), self.B.detach().clone(), self.scale)

    def delta_weight(self) -> Tensor:
        return self.scale * (self.B.detach() @ self.A.detach())


# -- the host --------------------------------------------------------------------------------------


class BranchHost:
    """Named sets of branches (one branch per LoRA layer) and the hooks that gate them."""

    ATTRIBUTE = "branch_host"

    def __init__(self, workbench):
        self.workbench = workbench
        self.peft_model = workbench.model
        self.hf_model = workbench.model.get_base_model()
        self.layers: dict[str, nn.Module] = {}
        for path, module in self.peft_model.named_modules():
            if is_lora_layer(module):
                name = module_name(path)
                self.layers[name] = module
                module.register_forward_pre_hook(partial(self._enter, name))
                module.register_forward_hook(partial(self._leave, name))
        self.hf_model.register_forward_pre_hook(self._before_model, with_kwargs=True)
        self.sets: dict[str, dict[str, Branch]] = {}
        self._primary_hooked: set[tuple[str, str]] = set()
        self._gating: Gating | None = None
        self._current: dict[str, tuple[Tensor, dict[str, Tensor | float]]] = {}
        self._in_model_hook = False

    @classmethod
    def of(cls, workbench) -> "BranchHost":
        """The host of ``workbench`` (installed on first use; one per live model)."""
        host = getattr(workbench, cls.ATTRIBUTE, None)
        if host is None:
            host = cls(workbench)
            setattr(workbench, cls.ATTRIBUTE, host)
        return host

    # -- building --------------------------------------------------------------------------------
    def base_layer(self, layer: str) -> nn.Module:
        return self.layers[layer].get_base_layer()

    def shape(self, layer: str) -> tuple[int, int]:
        """(out_features, in_features) of a layer's base weight."""
        weight = self.base_layer(layer).weight
        return int(weight.shape[0]), int(weight.shape[1])

    def device(self, layer: str) -> torch.device:
        return self.base_layer(layer).weight.device

    def add(self, name: str, make: Callable[[str, int, int, torch.device], Branch]) -> dict[str, Branch]:
        """Create branch set ``name`` with ``make(layer, out_features, in_features, device)`` per layer
        (idempotent: an existing set is returned unchanged)."""
        if name == PRIMARY:
            raise ValueError(f"'{PRIMARY}' is reserved for PEFT's own adapter")
        if name not in self.sets:
            branches = {}
            for layer in self.layers:
                out_features, in_features = self.shape(layer)
                branches[layer] = make(layer, out_features, in_features, self.device(layer))
            self.sets[name] = branches
        return self.sets[name]

    def add_lora(self, name: str, rank: int, lora: LoRAConfig, seed: int) -> dict[str, Branch]:
        """An extra LoRA adapter of ``rank`` on every layer, scaled like PEFT's (alpha/r or rsLoRA)."""
        scale = lora_scale(lora, rank)

        def make(layer, out_features, in_features, device):
            return LoRABranch(
                in_features, out_features, rank, scale, lora.dropout, device, torch_generator(seed, "branch-init", name, layer)
            )

        return self.add(name, make)

    # -- reading and writing ---------------------------------------------------------------------
    def read(self, name: str) -> dict[str, Tensor]:
        """Detached copies of set ``name``'s tensors, keyed '<layer>.<tensor>'."""
        return {f"{layer}.{key}": t.detach().clone() for layer, branch in self.sets[name].items() for key, t in branch.tensors().items()}

    def write(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Copy ``tensors`` (keys as from :meth:`read`) into set ``name``. Every tensor of the set must
        be covered, so nothing of a previous client survives into the next one."""
        branches = self.sets[name]
        expected = {f"{layer}.{key}": t for layer, branch in branches.items() for key, t in branch.tensors().items()}
        missing = sorted(set(expected) - set(tensors))
        unknown = sorted(set(tensors) - set(expected))
        if missing or unknown:
            problem = f"lacks '{missing[0]}'" if missing else f"names unknown '{unknown[0]}'"
            raise UpdateError(f"state for branch set '{name}' {problem}")
        with torch.no_grad():
            for key, param in expected.items():
                value = tensors[key]
                if tuple(value.shape) != tuple(param.shape):
                    raise UpdateError(f"'{key}' of branch set '{name}' has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
                param.copy_(value)

    def read_lora(self, name: str) -> dict[str, LoRAFactors]:
        return {layer: branch.factors() for layer, branch in self.sets[name].items()}  # type: ignore[union-attr]

    def write_lora(self, name: str, factors: dict[str, LoRAFactors]) -> None:
        """Write LoRA factors into LoRA branch set ``name`` (all layers; scales must agree)."""
        tensors = {}
        for layer, branch in self.sets[name].items():
            if layer not in factors:
                raise UpdateError(f"state for branch set '{name}' lacks module '{layer}'")
            given = factors[layer]
            if abs(given.scale - branch.scale) > 1e-6 * max(1.0, abs(branch.scale)):  # type: ignore[union-attr]
                raise UpdateError(f"module '{layer}' has scale {given.scale}, branch set '{name}' uses {branch.scale}")  # type: ignore[union-attr]
            tensors[f"{layer}.A"] = given.A
            tensors[f"{layer}.B"] = given.B
        unknown = sorted(set(factors) - set(self.sets[name]))
        if unknown:
            raise UpdateError(f"state for branch set '{name}' names unknown module '{unknown[0]}'")
        self.write(name, tensors)

    def parameters(self, name: str) -> list[nn.Parameter]:
        return [t for branch in self.sets[name].values() for t in branch.tensors().values()]

    # -- engaging ----------------------------------------------------------------------------------
    @contextmanager
    def engaged(self, gating: Gating) -> Iterator[Gating]:
        """Gate the live model with ``gating`` inside the block (nesting restores the outer gating)."""
        self._hook_primaries()
        outer = self._gating
        self._gating = gating
        self._current.clear()
        try:
            yield gating
        finally:
            self._gating = outer
            self._current.clear()

    @property
    def is_engaged(self) -> bool:
        return self._gating is not None

    def _hook_primaries(self) -> None:
        """Gate PEFT's own adapters through a hook on their ``lora_B`` (adapters of new ranks may
        have been added since the last engagement)."""
        for layer, module in self.layers.items():
            for adapter, lora_B in module.lora_B.items():
                if (layer, adapter) not in self._primary_hooked:
                    lora_B.register_forward_hook(partial(self._gate_primary, layer))
                    self._primary_hooked.add((layer, adapter))

    # -- hooks ---------------------------------------------------------------------------------------
    def _before_model(self, module, args, kwargs):
        if self._gating is None or self._in_model_hook:
            return None
        self._in_model_hook = True
        try:
            self._gating.before_forward(self, args, kwargs)
        finally:
            self._in_model_hook = False
        return None

    def _enter(self, layer, module, args):
        if self._gating is None or not args:
            return None
        x = args[0]
        self._current[layer] = (x, self._gating.gates(layer, x))
        return None

    def _gate_primary(self, layer, module, inputs, output):
        entry = self._current.get(layer)
        if entry is None:
            return None
        gate = entry[1].get(PRIMARY)
        if gate is None:
            return None
        return output * _expand(gate, output)

    def _leave(self, layer, module, args, output):
        entry = self._current.pop(layer, None)
        if entry is None:
            return None
        x, gates = entry
        for name, gate in gates.items():
            if name == PRIMARY or _is_off(gate):
                continue
            branch_set = self.sets.get(name)
            if branch_set is None:
                raise KeyError(f"gate names unknown branch set '{name}'")
            delta = branch_set[layer](x, module.training)
            output = output + (_expand(gate, delta) * delta).to(output.dtype)
        return output

    # -- representations --------------------------------------------------------------------------
    def representation(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean over real tokens of the backbone's last hidden state, (batch, hidden), float32.
        Runs with whatever gating is engaged."""
        backbone = self.hf_model.base_model
        with torch.no_grad():
            try:
                output = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except TypeError:
                output = backbone(input_ids=input_ids, attention_mask=attention_mask)
        hidden = output.last_hidden_state.float()
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


# -- training explicit parameters -----------------------------------------------------------------


def train_parameters(
    workbench,
    params: list[nn.Parameter],
    indices: np.ndarray,
    plan: TrainPlan,
    config: Config,
    rng_keys: tuple,
) -> dict[str, float]:
    """Like ``Workbench.train`` but over an explicit parameter list (branches, routers, parts of the
    live adapter); everything else stays frozen. Same seeded batches and dropout streams."""
    chosen = {id(p) for p in params}
    live = workbench.active.all_parameters()
    live_ids = {id(p) for p in live}
    others = [(p, p.requires_grad) for p in params if id(p) not in live_ids]
    for param in live:
        param.requires_grad_(id(param) in chosen)
    for param in params:
        param.requires_grad_(True)
    seed_everything(workbench.seed, "dropout", *rng_keys)
    batches = training_batches(
        workbench.data,
        indices,
        config.train.batch_size,
        workbench.pad_id,
        workbench.spec.kind,
        numpy_rng(workbench.seed, "batches", *rng_keys),
        config.train.group_by_length,
    )
    workbench.note_trained(params)
    try:
        return train_steps(workbench.model, params, batches, workbench.with_stage_hooks(plan))
    finally:
        for param in live:
            param.requires_grad_(True)  # the workbench's convention for its live adapter
        for param, flag in others:
            param.requires_grad_(flag)


def model_inputs(args: tuple, kwargs: dict[str, Any]) -> tuple[Tensor | None, Tensor | None]:
    """(input_ids, attention_mask) of a Hugging Face model call."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    attention_mask = kwargs.get("attention_mask")
    if input_ids is not None and attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return input_ids, attention_mask


def continues_generation(kwargs: dict[str, Any]) -> bool:
    """True for the second and later steps of cached generation (the prompt was seen already)."""
    cache = kwargs.get("past_key_values")
    if cache is None:
        return False
    length = getattr(cache, "get_seq_length", None)
    return bool(length() > 0) if callable(length) else True
