"""Gradient sparsification: only the largest entries (by magnitude) of the gradient the data party
returns survive; the rest are zeroed, which removes much of what label attacks read from it
(Lin, Han, Mao, Wang and Dally, "Deep Gradient Compression", ICLR 2018; used as a label defense in
split learning by VFLAIR, Zou et al. 2022, and VFLAIR-LLM's GradientSparsification).

``rate`` is the fraction of entries zeroed in each example's share (0.99 keeps the top 1 %).
DGC's residual accumulation is left out on purpose: a returned gradient belongs to the batch of
that step, so adding the previous batch's dropped entries would send gradients of other
examples. ``position: activations`` sparsifies what is sent instead.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams


class SparsificationParams(DefenseParams):
    rate: float = Field(0.9, ge=0, lt=1, description="fraction of each example's entries set to zero (larger: sparser, more private)")
    position: Literal["gradients", "activations"] = Field("gradients", description="sparsify the returned gradient or the sent activations")


def keep_largest(tensor, rate: float):
    """Zero all but the top (1 − rate) share of entries by magnitude, per example (dim 0)."""
    import torch

    flat = tensor.reshape(tensor.shape[0], -1)
    keep = max(1, int(round(flat.shape[1] * (1 - rate))))
    threshold = flat.abs().topk(keep, dim=1).values[:, -1:]
    return torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat)).view_as(tensor)


class GradientSparsification(Defense):
    name = "gradient-sparsification"
    paper = "Lin, Han, Mao, Wang and Dally, Deep Gradient Compression, ICLR 2018 (as a split-learning label defense in VFLAIR-LLM)"
    summary = "zero all but the largest (1 - rate) entries of each example's returned gradient (or of the sent activations)"
    Params = SparsificationParams

    def protect_gradients(self, gradients, step):
        if self.params.position != "gradients" or self.params.rate == 0:
            return gradients
        return keep_largest(gradients, self.params.rate)

    def protect_activations(self, activations, mask, step, phase):
        if self.params.position != "activations" or self.params.rate == 0:
            return activations
        return keep_largest(activations, self.params.rate)
