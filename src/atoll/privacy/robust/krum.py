"""Krum and Multi-Krum.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant
Gradient Descent", NeurIPS 2017. With n updates of which at most f are Byzantine (n > 2f + 2),
each update's score is the sum of squared distances to its n − f − 2 nearest other updates; Krum
keeps the update with the lowest score, Multi-Krum averages the m lowest-scoring ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def krum_scores(updates: Tensor, byzantine: int) -> Tensor:
    """Score of each row of ``updates`` (n x d): sum of squared distances to its n − f − 2 nearest rows."""
    count = updates.shape[0]
    neighbours = count - byzantine - 2
    if count <= 2 * byzantine + 2:
        raise ValueError(f"Krum needs n > 2f + 2 updates (n={count}, f={byzantine})")
    points = updates.to(torch.float64)
    distances = torch.cdist(points, points).pow(2)
    distances.fill_diagonal_(float("inf"))
    nearest = distances.sort(dim=1).values[:, :neighbours]
    return nearest.sum(dim=1)


@dataclass
class Selection:
    """The aggregate and the indices of the rows it was made from."""

    aggregate: Tensor
    selected: list[int]


def krum(updates: Tensor, byzantine: int) -> Selection:
    """The single update with the lowest Krum score."""
    index = int(torch.argmin(krum_scores(updates, byzantine)))
    return Selection(updates[index].clone(), [index])


def multi_krum(updates: Tensor, byzantine: int, keep: int) -> Selection:
    """The mean of the ``keep`` updates with the lowest Krum scores."""
    if not 1 <= keep <= updates.shape[0]:
        raise ValueError(f"Multi-Krum keeps between 1 and n updates, got {keep}")
    order = torch.argsort(krum_scores(updates, byzantine), stable=True)[:keep]
    selected = sorted(int(i) for i in order)
    return Selection(updates[selected].to(torch.float64).mean(dim=0).to(updates.dtype), selected)
