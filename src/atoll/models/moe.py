"""A mixture of LoRA experts with FedLEASE's adaptive top-M router on every adapted layer.

With M experts and a client assigned to expert c, each layer's router maps the layer input x (per
token) to 2M - 1 logits. Slots 0..M-1 all stand for expert c, slots M..2M-2 for the other experts
(in increasing order). The top M slots of softmax(logits) are kept and renormalised; an expert's
gate is the sum over its kept slots. Since M of the 2M - 1 slots are c's, at least one kept slot
is c's: the assigned expert is always used, and each token uses between 1 and M experts.

    y = W0 x + sum_e g_e(x) * s B_e A_e x,    g(x) >= 0,  sum_e g_e(x) = 1
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from atoll.config import LoRAConfig
from atoll.errors import UpdateError
from atoll.models.branches import PRIMARY, BranchHost, Gating
from atoll.seeding import torch_generator

ROUTER = "router"


def expert_name(expert: int) -> str:
    return f"expert{expert}"


def slot_experts(own: int, num_experts: int) -> Tensor:
    """Expert of each of the 2M - 1 router slots: M times ``own``, then the others in order."""
    others = [e for e in range(num_experts) if e != own]
    return torch.tensor([own] * num_experts + others, dtype=torch.long)


def adaptive_top_m(logits: Tensor, own: int, num_experts: int) -> Tensor:
    """Gates (..., M) from router logits (..., 2M - 1): top-M slots of the softmax, renormalised,
    summed per expert. Every row is a distribution over the selected experts."""
    if logits.shape[-1] != 2 * num_experts - 1:
        raise ValueError(f"router gives {logits.shape[-1]} outputs, expected 2M - 1 = {2 * num_experts - 1}")
    probabilities = torch.softmax(logits.float(), dim=-1)
    kept, slots = probabilities.topk(num_experts, dim=-1)
    kept = kept / kept.sum(dim=-1, keepdim=True)
    experts = slot_experts(own, num_experts).to(slots.device)[slots]
    gates = torch.zeros(*logits.shape[:-1], num_experts, dtype=kept.dtype, device=kept.device)
    return gates.scatter_add(-1, experts, kept)


def router_init(seed: int, layer: str, in_features: int, num_experts: int) -> dict[str, Tensor]:
    """A router's seeded initial weights (nn.Linear's uniform bound for the weight, zero bias)."""
    bound = 1.0 / math.sqrt(in_features)
    generator = torch_generator(seed, "fedlease-router", layer, num_experts)
    weight = (torch.rand(2 * num_experts - 1, in_features, generator=generator) * 2 - 1) * bound
    return {"weight": weight, "bias": torch.zeros(2 * num_experts - 1)}


class MixtureOfExperts:
    """M expert LoRA branch sets on a :class:`BranchHost` plus one router per layer (on each layer's
    device, outside the model's module tree). Sized once M is known (idempotent per M)."""

    ATTRIBUTE = "mixture_of_experts"

    def __init__(self, host: BranchHost):
        self.host = host
        self.num_experts = 0
        self.routers: dict[str, nn.Linear] = {}

    @classmethod
    def of(cls, workbench) -> "MixtureOfExperts":
        mixture = getattr(workbench, cls.ATTRIBUTE, None)
        if mixture is None:
            mixture = cls(BranchHost.of(workbench))
            setattr(workbench, cls.ATTRIBUTE, mixture)
        return mixture

    def ensure(self, num_experts: int, rank: int, lora: LoRAConfig, seed: int) -> None:
        if num_experts == self.num_experts:
            return
        for expert in range(num_experts):
            self.host.add_lora(expert_name(expert), rank, lora, seed)
        self.routers = {}
        for layer in self.host.layers:
            _, in_features = self.host.shape(layer)
            router = nn.Linear(in_features, 2 * num_experts - 1, device=self.host.device(layer))
            router.requires_grad_(False)
            self.routers[layer] = router
        self.num_experts = num_experts

    # -- router tensors: keys 'router.<layer>.weight' / '.bias' -----------------------------------
    def read_routers(self) -> dict[str, Tensor]:
        return {
            f"{ROUTER}.{layer}.{key}": p.detach().clone() for layer, router in self.routers.items() for key, p in router.named_parameters()
        }

    def write_routers(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for layer, router in self.routers.items():
                for key, param in router.named_parameters():
                    name = f"{ROUTER}.{layer}.{key}"
                    if name not in tensors:
                        raise UpdateError(f"router state lacks '{name}'")
                    if tuple(tensors[name].shape) != tuple(param.shape):
                        raise UpdateError(f"'{name}' has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}")
                    param.copy_(tensors[name])

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for router in self.routers.values() for p in router.parameters()]


class AdaptiveTopM(Gating):
    """Per-token expert gates of a client assigned to expert ``own``; PEFT's own adapter is off."""

    def __init__(self, mixture: MixtureOfExperts, own: int):
        self.mixture = mixture
        self.own = own

    def gates(self, layer: str, x: Tensor) -> dict[str, Tensor | float]:
        router = self.mixture.routers[layer]
        gates = adaptive_top_m(router(x.to(router.weight.dtype)), self.own, self.mixture.num_experts)
        result: dict[str, Tensor | float] = {PRIMARY: 0.0}
        for expert in range(self.mixture.num_experts):
            result[expert_name(expert)] = gates[..., expert]
        return result
