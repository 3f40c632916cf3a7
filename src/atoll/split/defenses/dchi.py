"""d_χ-privacy on word embeddings: every token's embedding is perturbed with noise of density
∝ exp(−η‖z‖) before the head runs, so any two tokens at distance d are (η·d)-indistinguishable
per release (Feyisetan, Balle, Drake and Diethe, "Privacy- and Utility-Preserving Textual
Analysis via Calibrated Multivariate Perturbations", WSDM 2020; SplitLLM's DxP defense).

The noise is sampled as a direction uniform on the sphere times a magnitude drawn from
Gamma(d, 1/η) (its radial law in d dimensions). ``project: true`` maps each noisy vector to the
nearest vocabulary embedding (Feyisetan et al.'s text-level variant: what is released is then a
token). Composed over T releases the guarantee is (T·η·d) for a token at distance d from another;
``report`` gives T·η.
"""

from __future__ import annotations

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams


def dchi_noise(count: int, dim: int, eta: float, generator):
    """``count`` vectors in R^dim with density ∝ exp(−η‖z‖): uniform direction, Gamma(dim, 1/η) norm."""
    import torch

    direction = torch.randn(count, dim, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    concentration = torch.full((count,), float(dim))
    magnitude = _gamma(concentration, generator) / eta
    return direction * magnitude.unsqueeze(-1)


def _gamma(shape_k, generator):
    """Gamma(k, 1) draws (k >= 1) by Marsaglia and Tsang's method (ACM TOMS 2000), from ``generator``."""
    import torch

    d = shape_k - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    result = torch.empty_like(shape_k)
    todo = torch.ones_like(shape_k, dtype=torch.bool)
    while todo.any():
        n = int(todo.sum())
        x = torch.randn(n, generator=generator)
        u = torch.rand(n, generator=generator)
        v = (1 + c[todo] * x) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-30)) < 0.5 * x**2 + d[todo] - d[todo] * v + d[todo] * torch.log(v.clamp_min(1e-30)))
        index = todo.nonzero().squeeze(-1)
        result[index[ok]] = (d[todo] * v)[ok]
        todo[index[ok]] = False
    return result


class DChiParams(DefenseParams):
    eta: float = Field(10.0, gt=0, description="privacy parameter η per unit of embedding distance (smaller: more noise)")
    project: bool = Field(False, description="map each noisy embedding to the nearest vocabulary embedding (release tokens)")


class DChiPrivacy(Defense):
    name = "dchi-privacy"
    paper = "Feyisetan, Balle, Drake and Diethe, WSDM 2020 (d_chi-privacy); SplitLLM's DxP (Chen et al., CCS 2024)"
    summary = "noise of density exp(-eta*|z|) on every token's word embedding before the head (optionally snapped to the nearest token)"
    Params = DChiParams

    def __init__(self, params: DChiParams, context):
        super().__init__(params, context)
        self.releases = 0

    def protect_embeddings(self, embeddings, mask, step, phase):
        import torch
        from torch.nn import functional as F

        from atoll.seeding import torch_generator

        self.releases += 1
        generator = torch_generator(self.context.seed, self.name, self.context.party, phase, step, self.releases)
        batch, length, dim = embeddings.shape
        noise = dchi_noise(batch * length, dim, self.params.eta, generator).view(batch, length, dim).to(embeddings.dtype)
        keep = mask.unsqueeze(-1).to(embeddings.dtype)
        noisy = embeddings + noise * keep
        if not self.params.project:
            return noisy
        table = self.context.word_embeddings.to(embeddings.dtype)
        with torch.no_grad():
            nearest = torch.cdist(noisy.detach().reshape(-1, dim), table).argmin(-1).view(batch, length)
        projected = F.embedding(nearest, table)
        # straight-through: the released values are the projected embeddings, gradients flow as if noise were added
        return torch.where(keep.bool(), noisy + (projected - noisy).detach(), embeddings)

    def report(self) -> dict[str, float]:
        return {"releases": float(self.releases), "eta": self.params.eta, "eta_composed": self.params.eta * self.releases}
