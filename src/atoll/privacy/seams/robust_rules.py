"""The robust rules of ``robust.rule`` applied to one round's changes (one row per update).

Each rule returns what the algorithm then aggregates: a subset of the updates (Krum, Multi-Krum,
FLAME's admitted cluster), the updates with bounded changes (norm bounding, FLAME's clipping), or
one change vector in place of the mean (coordinate-wise median, trimmed mean, FLTrust). The math is
in :mod:`atoll.privacy.robust`; papers there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from atoll.privacy.dp.clipping import clip_to_norm
from atoll.privacy.robust.coordinatewise import coordinate_median, trimmed_mean
from atoll.privacy.robust.flame import flame
from atoll.privacy.robust.fltrust import fltrust
from atoll.privacy.robust.krum import krum, multi_krum


@dataclass
class RobustOutcome:
    """``kept``: rows handed to the algorithm, with ``changes`` replacing some rows' change; or
    ``mean``: one change vector in place of the algorithm's mean. ``noise_stddev``: Gaussian noise
    FLAME adds to the aggregate afterwards."""

    kept: list[int] = field(default_factory=list)
    changes: dict[int, Tensor] = field(default_factory=dict)
    mean: Tensor | None = None
    noise_stddev: float = 0.0
    trust: list[float] = field(default_factory=list)


def apply_rule(settings, rows: Tensor, root_change: Tensor | None = None) -> RobustOutcome:
    """``settings`` is the ``robust`` section; ``rows`` is n x d (float64)."""
    rule, count = settings.rule, rows.shape[0]
    if rule == "krum":
        return RobustOutcome(kept=krum(rows, settings.byzantine).selected)
    if rule == "multi-krum":
        keep = settings.keep if settings.keep is not None else count - settings.byzantine
        return RobustOutcome(kept=multi_krum(rows, settings.byzantine, min(keep, count)).selected)
    if rule == "norm-bounding":
        return RobustOutcome(kept=list(range(count)), changes={i: clip_to_norm(rows[i], settings.norm_bound) for i in range(count)})
    if rule == "median":
        return RobustOutcome(mean=coordinate_median(rows))
    if rule == "trimmed-mean":
        return RobustOutcome(mean=trimmed_mean(rows, settings.trim_fraction))
    if rule == "fltrust":
        if root_change is None:
            raise ValueError("FLTrust needs the server's change on its root data")
        result = fltrust(rows, root_change)
        return RobustOutcome(mean=result.aggregate, trust=result.trust)
    if rule == "flame":
        result = flame(rows, noise_factor=0.0)  # admission and the median bound; the noise goes on the aggregate below
        return RobustOutcome(
            kept=result.admitted,
            changes={i: clip_to_norm(rows[i], result.clip_bound) for i in result.admitted},
            noise_stddev=settings.noise_factor * result.clip_bound,
        )
    raise ValueError(f"unknown robust rule '{rule}'")


def no_rows_like(rows: Tensor) -> Tensor:
    return torch.zeros(0, rows.shape[1], dtype=rows.dtype)
