"""Mutual-information defense (MID): a variational information bottleneck between the data
party's private side and the wire (Zou, Liu, Wang, Gu, Yang and others, "Mutual Information
Regularization for Vertical Federated Learning", arXiv 2301.01142, 2023; VFLAIR-LLM's MID).

An encoder maps each position's d-dimensional vector to the mean and standard deviation of a
k-dimensional Gaussian (σ = softplus(· − shift)), a sample z = μ + σ·ε (the mean at evaluation and
generation) is decoded back to d dimensions, and λ·KL(N(μ, σ²) ‖ N(0, I)) (averaged over real
positions) joins the loss, bounding the mutual information that passes.

- ``position: activations`` (head-tail or head-body-tail): the bottleneck sits on what is sent,
  limiting what the activations reveal about the input.
- ``position: tail`` (head-body-tail): it sits on the hidden states that come back, before the
  data party's tail, limiting what the gradient returned to the model party reveals about the
  labels.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams


class MIDParams(DefenseParams):
    position: Literal["activations", "tail"] = Field(
        "activations", description="activations: protect inputs; tail (head-body-tail): labels"
    )
    weight: float = Field(0.01, ge=0, description="λ: weight of the KL term (larger: narrower bottleneck, more private)")
    bottleneck: int = Field(64, gt=0, description="k: dimensions of the bottleneck")
    std_shift: float = Field(5.0, description="σ = softplus(raw − std_shift): a large shift starts the bottleneck nearly deterministic")


def make_bottleneck(dim: int, width: int):
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self):
            super().__init__()
            self.encode = nn.Linear(dim, 2 * width)
            self.decode = nn.Sequential(nn.Linear(width, dim), nn.GELU(), nn.Linear(dim, dim))

    module = Bottleneck()
    generator = torch.Generator().manual_seed(0)
    for layer in (module.encode, module.decode[0], module.decode[2]):
        nn.init.normal_(layer.weight, std=dim**-0.5, generator=generator)
        nn.init.zeros_(layer.bias)
    return module


class MID(Defense):
    name = "mid"
    paper = "Zou et al., Mutual Information Regularization for Vertical Federated Learning, arXiv 2301.01142 (2023)"
    summary = "variational information bottleneck (KL-regularised) on the sent activations or on the tail's input"
    Params = MIDParams

    def __init__(self, params: MIDParams, context):
        super().__init__(params, context)

        from atoll.errors import ConfigError

        if params.position == "tail" and context.partition != "head-body-tail":
            raise ConfigError("defense mid with position: tail needs split.partition=head-body-tail", "use position: activations")
        self.module = make_bottleneck(context.hidden_size, params.bottleneck)
        self.kl = None
        self.last_kl = 0.0

    def modules(self):
        return [self.module]

    def _squeeze(self, hidden, mask, step, phase):
        import torch
        from torch.nn import functional as F

        from atoll.seeding import torch_generator

        raw_mean, raw_std = self.module.encode(hidden).chunk(2, dim=-1)
        std = F.softplus(raw_std - self.params.std_shift)
        if phase == "train":
            generator = torch_generator(self.context.seed, self.name, self.context.party, phase, step)
            sample = raw_mean + std * torch.randn(raw_mean.shape, generator=generator, dtype=raw_mean.dtype)
        else:
            sample = raw_mean
        kl = 0.5 * (raw_mean.pow(2) + std.pow(2) - 2 * torch.log(std + 1e-12) - 1).sum(-1)
        keep = mask.to(kl.dtype) if mask is not None and kl.dim() == 2 else torch.ones_like(kl)
        self.kl = (kl * keep).sum() / keep.sum().clamp_min(1) / self.params.bottleneck
        return self.module.decode(sample)

    def protect_activations(self, activations, mask, step, phase):
        if self.params.position != "activations":
            return activations
        return self._squeeze(activations, mask, step, phase)

    def receive(self, received, mask, step, phase):
        if self.params.position != "tail":
            return received
        return self._squeeze(received, mask, step, phase)

    def extra_loss(self, exchange):
        if self.kl is None:
            return None
        self.last_kl = float(self.kl.detach())
        return self.params.weight * self.kl if self.params.weight else None

    def report(self) -> dict[str, float]:
        return {"kl": self.last_kl}
