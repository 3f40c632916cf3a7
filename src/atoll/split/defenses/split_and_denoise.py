"""Split-and-Denoise (SnD): the data party sends noisy activations and removes the noise from what
comes back with a denoiser of its own that knows the noise it added (Mai, Yan, Jiang, Chen, Zhang
and Pang, "Split-and-Denoise: Protect large language model inference with local differential
privacy", ICML 2024, arXiv 2310.09130; VFLAIR-LLM's SnD).

The noise on each position's vector follows d_χ-privacy: a uniform direction times a magnitude
drawn from Gamma(d, 1/η) (as in the paper's local-DP embedding perturbation). The denoiser is a
small residual MLP at the data party, applied in ``receive``: its input is what came back, the
data party's own noise and its clean activations (each the mean over the real positions when
what came back has no positions, e.g. class logits). Differently from the paper, which pre-trains
the denoiser on public data with access to the server's model, it is trained here end to end by
the task loss, since the data party cannot query the model party on clean activations without
revealing them.
"""

from __future__ import annotations

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams
from atoll.split.defenses.dchi import dchi_noise


class SnDParams(DefenseParams):
    eta: float = Field(100.0, gt=0, description="d_chi privacy parameter of the noise (smaller: more noise)")
    width: int = Field(256, gt=0, description="hidden width of the denoiser MLP")


class SplitAndDenoise(Defense):
    name = "split-and-denoise"
    paper = "Mai et al., Split-and-Denoise, ICML 2024 (arXiv 2310.09130)"
    summary = "d_chi noise on the sent activations; a denoiser at the data party (knowing its noise) cleans what comes back"
    Params = SnDParams

    def __init__(self, params: SnDParams, context):
        super().__init__(params, context)
        self.releases = 0
        self.noise = None
        self.clean = None
        self.mask = None
        self.noise_norm = 0.0
        if context.partition == "head-body-tail":
            returned = context.hidden_size
        else:
            returned = {"classification": context.num_labels, "question-answering": 2}.get(
                context.head_kind, context.word_embeddings.shape[0]
            )
        self._build(returned)

    def modules(self):
        return [self.denoiser]

    def _build(self, returned_dim: int):
        import torch
        from torch import nn

        dim = self.context.hidden_size
        generator = torch.Generator().manual_seed(self.context.seed)
        self.denoiser = nn.Sequential(
            nn.Linear(returned_dim + 2 * dim, self.params.width), nn.GELU(), nn.Linear(self.params.width, returned_dim)
        )
        nn.init.normal_(self.denoiser[0].weight, std=0.02, generator=generator)
        nn.init.zeros_(self.denoiser[2].weight)  # starts as the identity on what came back
        nn.init.zeros_(self.denoiser[0].bias)
        nn.init.zeros_(self.denoiser[2].bias)

    def protect_activations(self, activations, mask, step, phase):
        from atoll.seeding import torch_generator

        self.releases += 1
        generator = torch_generator(self.context.seed, self.name, self.context.party, phase, step, self.releases)
        batch, length, dim = activations.shape
        noise = dchi_noise(batch * length, dim, self.params.eta, generator).view(batch, length, dim).to(activations.dtype)
        noise = noise * mask.unsqueeze(-1).to(noise.dtype)
        self.noise, self.clean, self.mask = noise, activations.detach(), mask
        self.noise_norm = float(noise.norm(dim=-1).sum() / mask.sum().clamp_min(1))
        return activations + noise

    def receive(self, received, mask, step, phase):
        import torch

        if self.noise is None:
            return received
        noise, clean = self.noise, self.clean
        if received.dim() == 2:  # class logits: summarise the positions
            keep = self.mask.unsqueeze(-1).to(noise.dtype)
            count = keep.sum(1).clamp_min(1)
            noise, clean = (noise * keep).sum(1) / count, (clean * keep).sum(1) / count
        elif received.shape[1] != noise.shape[1]:  # generation: the newest positions only
            noise, clean = noise[:, -received.shape[1] :], clean[:, -received.shape[1] :]
        features = torch.cat([received, noise.to(received.dtype), clean.to(received.dtype)], dim=-1)
        return received + self.denoiser(features)

    def report(self) -> dict[str, float]:
        return {"releases": float(self.releases), "mean_noise_norm": self.noise_norm}
