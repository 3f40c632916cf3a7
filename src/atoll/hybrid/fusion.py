"""Fusion rules on the cloud's top-k support, in log space, renormalised over the support.

Notation: S = the support (edge ids), e = the (tuned) edge's log-probabilities on S, b = the
untuned edge's, c = the cloud's. Every rule returns log-probabilities over S that sum to one;
constants added to e, b or c change nothing, so log-probabilities and logits are interchangeable.

- ``cloud``:    c
- ``weighted``: w·e + (1 − w)·c  (a log-linear product of experts, Hinton, Neural Computation 2002)
- ``proxy``:    c + α·(e − b)    (proxy-tuning, Liu et al., "Tuning Language Models by Proxy", COLM 2024:
                the tuned-minus-untuned small model steers the large one)
- ``router``:   w_e·e + w_c·c with w ∝ exp(−H), H the entropy of each model's distribution on S:
                parameter-free, the more confident model weighs more. Floe's router (Tian et al.,
                arXiv 2602.14302, 2026) is parameter-free too; its exact rule is not published in the
                abstract, so this rule is ours.

Support: ``cloud`` is the cloud's aligned top-k (what the issue asks). ``union`` adds the edge's own
top-k tokens and gives them the cloud log-probability min(p_k, residual): an upper bound on what
the cloud could have put on a token it did not list (p_k its smallest listed probability, residual
the mass outside its top-k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atoll.hybrid.vocab import Aligned


@dataclass
class Fused:
    """The fused distribution over ``support`` (edge ids) and the edge's weight in it (nan where
    the rule has no such weight)."""

    support: torch.Tensor
    logprobs: torch.Tensor
    edge_weight: float

    def argmax(self) -> int:
        return int(self.support[int(torch.argmax(self.logprobs))])

    def logprob_of(self, token_id: int) -> float:
        hits = (self.support == token_id).nonzero()
        return float(self.logprobs[int(hits[0, 0])]) if len(hits) else -math.inf


def renormalise(logits: torch.Tensor) -> torch.Tensor:
    return logits - torch.logsumexp(logits, dim=-1)


def entropy(logprobs: torch.Tensor) -> float:
    """Shannon entropy (nats) of the renormalised distribution."""
    normal = renormalise(logprobs)
    probs = normal.exp()
    return float(-(probs * torch.where(probs > 0, normal, torch.zeros_like(normal))).sum())


def router_weight(edge_logprobs: torch.Tensor, cloud_logprobs: torch.Tensor) -> float:
    """The edge's weight exp(−H_e) / (exp(−H_e) + exp(−H_c)), entropies on the same support."""
    confidence_edge = math.exp(-entropy(edge_logprobs))
    confidence_cloud = math.exp(-entropy(cloud_logprobs))
    return confidence_edge / (confidence_edge + confidence_cloud)


def build_support(aligned: Aligned, edge_logprobs: torch.Tensor, mode: str, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(support ids, cloud log-probabilities on them)."""
    if mode == "cloud" or len(aligned.ids) == 0:
        return aligned.ids, aligned.logprobs
    edge_top = torch.topk(edge_logprobs, min(top_k, edge_logprobs.numel())).indices
    extra = edge_top[~torch.isin(edge_top, aligned.ids)]
    if len(extra) == 0:
        return aligned.ids, aligned.logprobs
    smallest = float(aligned.logprobs.min())
    bound = min(smallest, math.log(aligned.residual_mass) if aligned.residual_mass > 0 else -math.inf)
    floor = torch.full((len(extra),), bound, dtype=aligned.logprobs.dtype)
    return torch.cat([aligned.ids, extra]), torch.cat([aligned.logprobs, floor])


def fuse(
    method: str,
    aligned: Aligned,
    edge_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor | None = None,
    *,
    edge_weight: float = 0.5,
    alpha: float = 1.0,
    support: str = "cloud",
    top_k: int = 5,
) -> Fused | None:
    """Fuse one position. ``edge_logprobs`` / ``base_logprobs`` are over the full edge vocabulary.
    None when the cloud's top-k maps to no edge token at all (the edge token then stands)."""
    ids, cloud = build_support(aligned, edge_logprobs, support, top_k)
    if len(ids) == 0:
        return None
    edge = edge_logprobs[ids]
    if method == "cloud":
        return Fused(ids, renormalise(cloud), 0.0)
    if method == "weighted":
        return Fused(ids, renormalise(_mix(edge, cloud, edge_weight)), edge_weight)
    if method == "proxy":
        if base_logprobs is None:
            raise ValueError("proxy-tuning needs the untuned edge's log-probabilities")
        return Fused(ids, renormalise(cloud + alpha * (edge - base_logprobs[ids])), math.nan)
    if method == "router":
        weight = router_weight(edge, cloud)
        return Fused(ids, renormalise(_mix(edge, cloud, weight)), weight)
    raise ValueError(f"unknown fusion method {method!r}")


def _mix(edge: torch.Tensor, cloud: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """w·e + (1 − w)·c where an infinite term with weight 0 contributes 0 (not nan)."""
    mixed = torch.zeros_like(edge)
    if edge_weight > 0:
        mixed = mixed + edge_weight * edge
    if edge_weight < 1:
        mixed = mixed + (1 - edge_weight) * cloud
    return mixed
