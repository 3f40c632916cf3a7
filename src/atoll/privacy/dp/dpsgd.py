"""Example-level DP-SGD inside one client, on the trainable (LoRA) parameters, with opacus.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep Learning with Differential
Privacy", CCS 2016. Every step draws a Poisson sample of the client's examples (rate q), computes
per-example gradients, clips each to L2 norm C, sums, adds N(0, σ²C²I) and divides by the expected
batch size qn. Per-example gradients and the clipped noisy step come from opacus
(Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021) in its
``hooks`` or ``functorch`` mode; the client's own ε comes from the same accountant as DP-FedAvg.
The frozen base never receives gradients, so only the LoRA factors (and a trained head) move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from atoll.privacy.dp.accounting import PrivacyAccountant

PerExampleLoss = Callable[[nn.Module, dict[str, Tensor]], Tensor]


@dataclass(frozen=True)
class DPSGDPlan:
    """σ, C, the Poisson sampling rate q per step, steps, learning rate, and δ for the reported ε."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    lr: float
    delta: float = 1e-5
    grad_sample_mode: str = "hooks"  # hooks or functorch (not ghost: tied embeddings break it)
    optimizer: str = "sgd"  # sgd or adamw


@dataclass
class DPSGDResult:
    epsilon: float
    steps: int
    mean_loss: float
    examples_seen: int


def causal_lm_example_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-sequence mean next-token loss (labels −100 are ignored): one value per example."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    token_losses = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none")
    counts = (targets != -100).sum(dim=1).clamp_min(1)
    return token_losses.sum(dim=1) / counts


def classifier_example_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")


def dp_sgd_train(
    model: nn.Module,
    examples: dict[str, Tensor],
    plan: DPSGDPlan,
    per_example_loss: PerExampleLoss,
    generator: torch.Generator,
) -> DPSGDResult:
    """Run ``plan.steps`` DP-SGD steps on ``model``'s trainable parameters over ``examples``
    (tensors with the example count as first dimension); report this client's ε at ``plan.delta``."""
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    if plan.grad_sample_mode not in ("hooks", "functorch"):
        raise ValueError(f"grad_sample_mode '{plan.grad_sample_mode}' is not supported here; use hooks or functorch")
    params = [p for p in model.parameters() if p.requires_grad]
    count = next(iter(examples.values())).shape[0]
    expected_batch = plan.sample_rate * count
    wrapped = GradSampleModule(
        model, batch_first=True, loss_reduction="mean", strict=False, force_functorch=plan.grad_sample_mode == "functorch"
    )
    base = torch.optim.SGD(params, lr=plan.lr) if plan.optimizer == "sgd" else torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)
    optimizer = DPOptimizer(
        base, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm, expected_batch_size=max(1, round(expected_batch))
    )
    optimizer.expected_batch_size = expected_batch  # the exact qn the mechanism divides by
    optimizer.generator = generator
    accountant = PrivacyAccountant("rdp")
    total_loss, seen = 0.0, 0
    model.train()
    try:
        for _ in range(plan.steps):
            chosen = torch.nonzero(torch.rand(count, generator=generator) < plan.sample_rate).reshape(-1)
            optimizer.zero_grad(set_to_none=True)
            if chosen.numel() == 0:
                # an empty Poisson sample still releases noise: the step is N(0, σ²C²) / (qn)
                for p in params:
                    noise = torch.normal(0.0, plan.noise_multiplier * plan.max_grad_norm, p.shape, generator=generator)
                    p.grad = (noise / expected_batch).to(p.dtype)
                base.step()
            else:
                batch = {key: value[chosen] for key, value in examples.items()}
                losses = per_example_loss(wrapped, batch)
                losses.mean().backward()
                missing = [p.shape for p in params if getattr(p, "grad_sample", None) is None]
                if missing:
                    raise RuntimeError(f"opacus computed no per-example gradient for parameters of shape {missing}")
                optimizer.step()
                total_loss += float(losses.detach().sum())
                seen += int(chosen.numel())
            if plan.noise_multiplier > 0:
                accountant.step(plan.noise_multiplier, plan.sample_rate)
    finally:
        optimizer.zero_grad(set_to_none=True)
        wrapped.to_standard_module()
        for p in params:
            p.grad = None
        model.eval()
    epsilon = accountant.epsilon(plan.delta) if plan.noise_multiplier > 0 else float("inf")
    return DPSGDResult(epsilon, plan.steps, total_loss / max(1, seen), seen)
