"""FLoRA: stacking-based exact aggregation with heterogeneous ranks (Wang et al., "FLoRA:
Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
NeurIPS 2024).

Each round every client starts from a fresh LoRA of its own rank r_k (PEFT init, seeded by
(seed, round): A kaiming-uniform, B = 0) on top of the merged base, and trains it. The server
stacks the uploads, A_stack = [p_1 s_1 A_1; ...; p_K s_K A_K], B_stack = [B_1, ..., B_K], so that
    B_stack A_stack = sum_k p_k s_k B_k A_k = dW*   (s_k = alpha/r_k, each client's own scale)
and merges dW* into the base: W0' = W0 + dW* (kept cumulatively in AdapterState.base). The
head is averaged with p_k. Ranks differ freely: stacking needs no common rank.

Downlink (a client keeps no model copy): the stacks of every round so far, from which the
client rebuilds the merged base exactly (sum over rounds of B_stack A_stack, the server's own
accumulation order), or the dense merged base once that is smaller (``downlink: auto``); so
the download grows with sum_k r_k until it reaches the dense size. ``downlink: dense`` always
sends the dense base. The fresh LoRA itself costs nothing: every client draws it from the seed.

mixed_ranks "native". not asynchronous: a round's fresh LoRAs and its stack are merged
together; an update trained on an older base would be merged onto a newer one.
"""

from __future__ import annotations


import torch
from torch import Tensor

from atoll.algorithms.catalog import SPECS
from atoll.algorithms._lowrank import kaiming_uniform, stack
from atoll.fl.base import BaseClient, BaseServer, weighted_average
from atoll.fl.state import AdapterState, LoRAFactors, Update, example_weights
from atoll.seeding import torch_generator

STACK_PREFIX = "flora/"


def stack_key(round: int, module: str, which: str) -> str:
    return f"{STACK_PREFIX}{round}/{module}/{which}"


def parse_stack_key(key: str) -> tuple[int, str, str]:
    _, round, rest = key.split("/", 2)
    module, which = rest.rsplit("/", 1)
    return int(round), module, which


def accumulate(total: Tensor | None, B_stack: Tensor, A_stack: Tensor) -> Tensor:
    """total + B_stack @ A_stack in float32; server and clients use this same order of sums, so
    a base rebuilt from stacks equals the server's base bit for bit."""
    product = B_stack.float() @ A_stack.float()
    return product if total is None else total + product


def fresh_lora(template: AdapterState, seed: int, round: int) -> dict[str, LoRAFactors]:
    """A new PEFT-style LoRA of the template's rank and scales: A ~ kaiming-uniform from
    (seed, round, module, rank), B = 0."""
    lora = {}
    for name, f in sorted(template.lora.items()):
        rank, in_features = f.A.shape
        A = kaiming_uniform(rank, in_features, torch_generator(seed, "flora-init", round, name, rank)).to(f.A.dtype)
        lora[name] = LoRAFactors(A, torch.zeros_like(f.B), f.scale)
    return lora


def rebuild_base(message: AdapterState) -> dict[str, Tensor]:
    """The merged base delta carried by a download: dense, or rebuilt from the stacks."""
    if message.base:
        return {n: t.clone() for n, t in message.base.items()}
    stacks: dict[int, dict[str, dict[str, Tensor]]] = {}
    for key, tensor in message.control.items():
        if key.startswith(STACK_PREFIX):
            round, module, which = parse_stack_key(key)
            stacks.setdefault(round, {}).setdefault(module, {})[which] = tensor
    base: dict[str, Tensor] = {}
    for round in sorted(stacks):
        for module, parts in stacks[round].items():
            base[module] = accumulate(base.get(module), parts["B"], parts["A"])
    return base


class FLoRAClient(BaseClient):
    def compose(self, round: int, download: AdapterState) -> AdapterState:
        template = self.workbench.initial_state(self.context.rank)
        extra = {n: t.clone() for n, t in download.extra.items()}
        return AdapterState(fresh_lora(template, self.context.config.seed, round), extra, rebuild_base(download))

    def upload(self, round: int, start: AdapterState, trained: AdapterState) -> AdapterState:
        return AdapterState(trained.lora, trained.extra)  # the base is the server's; never sent back


class FLoRA(BaseServer):
    spec = SPECS["flora"]
    client_class = FLoRAClient

    def __init__(self, context, params):
        super().__init__(context, params)
        # the global adapter is the merged base only: its LoRA part is zero (B = 0)
        for factors in self.global_state.lora.values():
            factors.B = torch.zeros_like(factors.B)
        self.stacks: list[tuple[int, dict[str, tuple[Tensor, Tensor]]]] | None = [] if params.downlink == "auto" else None

    def configure(self, round: int, client_id: int) -> AdapterState:
        extra = dict(self.global_state.extra)
        if self.stacks is None:
            return AdapterState({}, extra, dict(self.global_state.base))
        control = {}  # every round's stacked factors, from which the client rebuilds the merged base
        for merged_round, modules in self.stacks:
            for module, (B_stack, A_stack) in modules.items():
                control[stack_key(merged_round, module, "B")] = B_stack
                control[stack_key(merged_round, module, "A")] = A_stack
        return AdapterState({}, extra, {}, control)

    def aggregate(self, round: int, updates: list[Update]) -> None:
        if not updates:
            return
        weights = example_weights(updates)
        merged: dict[str, tuple[Tensor, Tensor]] = {}
        base = dict(self.global_state.base)
        for name in self.global_state.lora:
            B_stack, A_stack = stack([u.state.lora[name] for u in updates], weights)
            merged[name] = (B_stack, A_stack)
            base[name] = accumulate(base.get(name), B_stack, A_stack)
        extra = {name: weighted_average([u.state.extra[name] for u in updates], weights) for name in self.global_state.extra}
        self.global_state = AdapterState(self.global_state.lora, extra, base)
        if self.stacks is not None:
            self.stacks.append((round, merged))
            stacked = sum(B.numel() + A.numel() for _, modules in self.stacks for B, A in modules.values())
            if stacked >= sum(t.numel() for t in base.values()):
                self.stacks = None  # from now on the dense base is the cheaper download

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        tensors = super().state_dict()
        tensors[f"{STACK_PREFIX}dense"] = torch.tensor(self.stacks is None)
        for merged_round, modules in self.stacks or []:
            for module, (B_stack, A_stack) in modules.items():
                tensors[stack_key(merged_round, module, "B")] = B_stack
                tensors[stack_key(merged_round, module, "A")] = A_stack
        return tensors

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        super().load_state_dict(tensors)
        if bool(tensors[f"{STACK_PREFIX}dense"]):
            self.stacks = None
            return
        rounds: dict[int, dict[str, dict[str, Tensor]]] = {}
        for key, tensor in tensors.items():
            if key.startswith(STACK_PREFIX) and key != f"{STACK_PREFIX}dense":
                merged_round, module, which = parse_stack_key(key)
                rounds.setdefault(merged_round, {}).setdefault(module, {})[which] = tensor
        self.stacks = [(r, {m: (p["B"], p["A"]) for m, p in sorted(rounds[r].items())}) for r in sorted(rounds)]
