"""A clustering defense in the spirit of FLAME.

Nguyen, Rieger, Chen, Yalame, Möllering, Fereidooni, Marchal, Miettinen, Mirhoseini, Zeitouni,
Koushanfar, Sadeghi, Schneider, "FLAME: Taming Backdoors in Federated Learning", USENIX Security
2022. Three steps: (1) cluster the updates by cosine distance and admit only the majority cluster
(FLAME uses HDBSCAN with a minimum cluster size of n/2 + 1); (2) clip every admitted update to the
median L2 norm S of all updates; (3) average and add Gaussian noise of standard deviation λ·S.

Step 1 here is single-linkage clustering on cosine distances (the hierarchy HDBSCAN builds when
min_samples = 1), cut at the first merge where a component of more than n/2 updates forms: that
component is admitted, everyone else is excluded. It is not HDBSCAN's stability-based selection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from atoll.privacy.dp.clipping import clip_to_norm


def majority_cluster(updates: Tensor) -> list[int]:
    """Indices of the first single-linkage component (cosine distance) with more than n/2 members."""
    count = updates.shape[0]
    if count <= 2:
        return list(range(count))
    points = updates.to(torch.float64)
    unit = points / torch.linalg.vector_norm(points, dim=1, keepdim=True).clamp_min(1e-30)
    distance = 1.0 - unit @ unit.T
    parent = list(range(count))
    size = [1] * count

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    edges = sorted((float(distance[i, j]), i, j) for i in range(count) for j in range(i + 1, count))
    needed = count // 2 + 1
    for _, i, j in edges:
        a, b = root(i), root(j)
        if a == b:
            continue
        if size[a] < size[b]:
            a, b = b, a
        parent[b] = a
        size[a] += size[b]
        if size[a] >= needed:
            return [k for k in range(count) if root(k) == a]
    return list(range(count))


@dataclass
class FlameAggregate:
    aggregate: Tensor
    admitted: list[int]
    clip_bound: float


def flame(updates: Tensor, noise_factor: float = 0.001, generator: torch.Generator | None = None) -> FlameAggregate:
    """Admit the majority cluster, clip to the median norm S, average, add N(0, (λS)²)."""
    admitted = majority_cluster(updates)
    norms = torch.linalg.vector_norm(updates.to(torch.float64), dim=1)
    bound = (
        float(norms.median())
        if updates.shape[0] % 2
        else float(norms.sort().values[updates.shape[0] // 2 - 1 : updates.shape[0] // 2 + 1].mean())
    )
    clipped = torch.stack([clip_to_norm(updates[i].to(torch.float64), bound) for i in admitted])
    aggregate = clipped.mean(dim=0)
    if noise_factor > 0:
        aggregate = aggregate + torch.normal(0.0, noise_factor * bound, aggregate.shape, generator=generator, dtype=torch.float64)
    return FlameAggregate(aggregate.to(updates.dtype), admitted, bound)
