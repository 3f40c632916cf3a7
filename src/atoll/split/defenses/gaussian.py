"""Gaussian noise on the activations the data party sends.

The smashed data h is released as h + N(0, σ²I), at training, evaluation and generation alike,
so an inversion attack sees only the noisy tensor. Noise on the cut layer's activations is the
simplest defense against model inversion in split networks (Titcombe et al., "Practical Defences
Against Model Inversion Attacks for Split Neural Networks", ICLR 2021 DPML workshop, with Laplace
noise; SplitLLM's Gaussian defense, Chen et al., "Unveiling the Vulnerability of Private
Fine-Tuning in Split-Based Frameworks for Large Language Models: A Bidirectionally Enhanced
Attack", CCS 2024). It carries no formal privacy guarantee here: activations are not clipped,
so no ε is claimed; larger σ lowers what inversion recovers and what the task learns.
"""

from __future__ import annotations

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams


class GaussianNoiseParams(DefenseParams):
    sigma: float = Field(0.1, ge=0, description="standard deviation of the noise added to every activation coordinate")


class GaussianNoise(Defense):
    name = "gaussian-noise"
    paper = "Titcombe et al., ICLR 2021 DPML workshop (noise on split activations); Gaussian as in SplitLLM (Chen et al., CCS 2024)"
    summary = "adds N(0, sigma^2) to every activation the data party sends (train, eval and generation)"
    Params = GaussianNoiseParams

    def __init__(self, params: GaussianNoiseParams, context):
        super().__init__(params, context)
        self.releases = 0
        self.noise_to_signal = 0.0

    def protect_activations(self, activations, mask, step, phase):
        import torch

        from atoll.seeding import torch_generator

        self.releases += 1
        sigma = self.params.sigma
        if sigma == 0:
            return activations
        generator = torch_generator(self.context.seed, self.name, self.context.party, phase, step, self.releases)
        noise = torch.randn(activations.shape, generator=generator, dtype=activations.dtype) * sigma
        signal = float(activations.detach().pow(2).mean())
        self.noise_to_signal = sigma**2 / signal if signal > 0 else float("inf")
        return activations + noise

    def report(self) -> dict[str, float]:
        return {"sigma": self.params.sigma, "releases": float(self.releases), "noise_to_signal": self.noise_to_signal}
