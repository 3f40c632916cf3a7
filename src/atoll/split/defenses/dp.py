"""Differential privacy on what the data party releases: Laplace or Gaussian noise on the
activations it sends (protects inputs) or on the gradients it returns (protects labels), with
per-example clipping so the sensitivity is known, and ε composed over every release.

Each example's share of a released tensor (its activations at the real positions, or its row of
the returned gradient) is clipped to norm ``clip`` (L1 for Laplace, L2 for Gaussian); padding
positions are zeroed. Neighbouring batches differ in one example (replace-one: the batch size
and row order are visible on the wire), so the sensitivity is Δ = 2·clip. Noise is calibrated
to the per-release ``epsilon`` (and ``delta``), and :meth:`report` gives ε composed over every
release this data party made in training, evaluation and generation (see ``accounting``): an
upper bound for any one example, which is in only some of them (no amplification by sampling
is claimed).

Laplace: Dwork, McSherry, Nissim and Smith, "Calibrating Noise to Sensitivity in Private Data
Analysis", TCC 2006 (VFLAIR-LLM's LaplaceDP, there without clipping on activations and without
composition). Gaussian: Dwork and Roth, "The Algorithmic Foundations of Differential Privacy",
2014, calibrated exactly (Balle and Wang, ICML 2018) and composed as Gaussian DP (Dong, Roth and
Su, JRSS-B 2022).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from atoll.split.defenses import accounting
from atoll.split.defenses.base import Defense, DefenseParams


class DPParams(DefenseParams):
    position: Literal["activations", "gradients"] = Field(
        "activations", description="activations: noise on what is sent (protects inputs); gradients: on the returned gradient (labels)"
    )
    epsilon: float = Field(10.0, gt=0, description="ε of one release (smaller: more noise); the report composes it over all releases")
    clip: float = Field(1.0, gt=0, description="per-example norm bound of a release (L1 for Laplace, L2 for Gaussian)")
    delta: float = Field(
        1e-5, gt=0, lt=1, description="Gaussian: δ of one release and of the composed ε; Laplace: δ' of advanced composition"
    )


def clip_per_example(tensor, mask, bound: float, order: int):
    """Zero the padding positions (when ``mask`` is given) and scale each example (dim 0) down to
    norm ``bound`` (L1 or L2 over all its other dimensions)."""
    import torch

    if mask is not None and tensor.dim() == 3 and mask.shape == tensor.shape[:2]:
        tensor = tensor * mask.unsqueeze(-1).to(tensor.dtype)
    flat = tensor.reshape(tensor.shape[0], -1)
    norms = flat.abs().sum(-1) if order == 1 else flat.pow(2).sum(-1).sqrt()
    factor = torch.clamp(bound / (norms + 1e-12), max=1.0)
    return tensor * factor.view(-1, *([1] * (tensor.dim() - 1)))


class NoiseMechanism(Defense):
    """Shared by Laplace and Gaussian DP: clip, add calibrated noise, count releases."""

    Params = DPParams
    norm_order = 2

    def __init__(self, params: DPParams, context):
        super().__init__(params, context)
        self.releases = 0

    @property
    def sensitivity(self) -> float:
        return 2 * self.params.clip

    def noise(self, shape, generator):
        raise NotImplementedError

    def release(self, tensor, mask, step: int, phase: str):
        from atoll.seeding import torch_generator

        self.releases += 1
        clipped = clip_per_example(tensor, mask, self.params.clip, self.norm_order)
        generator = torch_generator(self.context.seed, self.name, self.params.position, self.context.party, phase, step, self.releases)
        noise = self.noise(clipped.shape, generator).to(clipped.dtype)
        if mask is not None and clipped.dim() == 3 and mask.shape == clipped.shape[:2]:
            noise = noise * mask.unsqueeze(-1).to(noise.dtype)
        return clipped + noise

    def protect_activations(self, activations, mask, step, phase):
        if self.params.position != "activations":
            return activations
        return self.release(activations, mask, step, phase)

    def protect_gradients(self, gradients, step):
        if self.params.position != "gradients":
            return gradients
        return self.release(gradients, None, step, "train")


class LaplaceDP(NoiseMechanism):
    name = "laplace-dp"
    paper = "Dwork, McSherry, Nissim and Smith, TCC 2006 (Laplace mechanism); advanced composition: Dwork, Rothblum and Vadhan, FOCS 2010"
    summary = (
        "clip each example (L1) and add Laplace noise of scale 2*clip/epsilon to activations or gradients; epsilon composed over releases"
    )
    norm_order = 1

    @property
    def scale(self) -> float:
        return accounting.laplace_scale(self.params.epsilon, self.sensitivity)

    def noise(self, shape, generator):
        import torch

        uniform = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
        # inverse CDF of Laplace(0, b): -b * sign(u) * log(1 - 2|u|)
        return -self.scale * torch.sign(uniform) * torch.log1p(-2 * uniform.abs().clamp(max=0.5 - 1e-12))

    def report(self) -> dict[str, float]:
        epsilon, delta = accounting.laplace_composed(self.params.epsilon, self.releases, self.params.delta)
        return {"releases": float(self.releases), "epsilon": epsilon, "delta": delta, "noise_scale": self.scale}


class GaussianDP(NoiseMechanism):
    name = "gaussian-dp"
    paper = "Gaussian mechanism (Dwork and Roth, 2014), calibrated exactly (Balle and Wang, ICML 2018), composed as Gaussian DP (Dong, Roth and Su, JRSS-B 2022)"
    summary = (
        "clip each example (L2) and add Gaussian noise exactly calibrated to (epsilon, delta) per release; epsilon composed over releases"
    )
    norm_order = 2

    def __init__(self, params: DPParams, context):
        super().__init__(params, context)
        self.mu = accounting.gdp_mu(params.epsilon, params.delta)

    @property
    def sigma(self) -> float:
        return self.sensitivity / self.mu

    def noise(self, shape, generator):
        import torch

        return torch.randn(shape, generator=generator, dtype=torch.float64) * self.sigma

    def report(self) -> dict[str, float]:
        epsilon = accounting.gaussian_composed(self.mu, self.releases, self.params.delta)
        return {"releases": float(self.releases), "epsilon": epsilon, "delta": self.params.delta, "sigma": self.sigma}
