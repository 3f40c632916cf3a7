"""NoPeek: the data party adds α·DistCorr(X, Z) to its loss, the distance correlation between each
example's raw input (its word embeddings) and what it sends, so training itself makes the sent
activations less informative about the input (Vepakomma, Singh, Gupta and Raskar, "NoPeek:
Information leakage reduction to share activations in distributed deep learning", ICDM
Workshops 2020; SplitLLM's NoPeek).

Distance correlation (Székely, Rizzo and Bakirov, Annals of Statistics 2007) is computed over
the examples of the batch, each flattened over its padded positions (padding zeroed).
"""

from __future__ import annotations

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams


def distance_correlation(x, z):
    """Sample distance correlation of two batches [n, p] and [n, q] (0: independent, 1: one
    determines the other up to a similarity transform)."""
    import torch

    def centred(a):
        distances = torch.cdist(a, a)
        return distances - distances.mean(0, keepdim=True) - distances.mean(1, keepdim=True) + distances.mean()

    a, b = centred(x), centred(z)
    covariance = (a * b).mean()
    variance = (a * a).mean().sqrt() * (b * b).mean().sqrt()
    return (covariance.clamp_min(0) / variance.clamp_min(1e-12)).sqrt()


class NoPeekParams(DefenseParams):
    weight: float = Field(0.5, ge=0, description="α: weight of the distance correlation term (larger: more private, less accurate)")


class NoPeek(Defense):
    name = "nopeek"
    paper = "Vepakomma, Singh, Gupta and Raskar, NoPeek, ICDM Workshops 2020"
    summary = "adds weight * distance correlation(input embeddings, sent activations) to the data party's loss"
    Params = NoPeekParams

    def __init__(self, params: NoPeekParams, context):
        super().__init__(params, context)
        self.last = 0.0

    def extra_loss(self, exchange):
        keep = exchange.batch["attention_mask"].unsqueeze(-1).to(exchange.sent.dtype)
        inputs = (exchange.embeddings * keep).flatten(1)
        sent = (exchange.sent * keep).flatten(1) if exchange.sent.dim() == 3 else exchange.sent.flatten(1)
        value = distance_correlation(inputs.float(), sent.float())
        self.last = float(value.detach())
        return self.params.weight * value if self.params.weight else None

    def report(self) -> dict[str, float]:
        return {"distance_correlation": self.last}
