"""Stop a run whose training diverged instead of finishing it with exit 0 and no warning.

The reference is the untrained model's global loss (the round-0 evaluation, ``eval.initial``) or,
without one, the first round's train loss. A round whose train loss or global loss is not finite,
or more than :data:`FACTOR` times the reference (taken as at least :data:`FLOOR`, so a run that
starts near zero loss is not stopped for ordinary noise), ends the run with a
:class:`~atoll.errors.DivergenceError`. Healthy training never grows its loss a hundredfold; a
learning rate far too high does within a round or two.
"""

from __future__ import annotations

import math
from typing import Any

from atoll.errors import DivergenceError

FACTOR = 100.0
FLOOR = 0.1


def losses(record: dict[str, Any]) -> dict[str, float]:
    """The round's train loss (when someone trained) and global loss (when evaluated)."""
    found = {}
    train = record.get("train") or {}
    if "loss" in train and train.get("examples", 1) > 0:
        found["train loss"] = float(train["loss"])
    if "loss" in (record.get("global") or {}):
        found["global loss"] = float(record["global"]["loss"])
    return found


class DivergenceWatch:
    """Keeps the reference loss and refuses records whose losses diverged from it."""

    def __init__(self, records: list[dict[str, Any]] | None = None):
        self.reference: tuple[str, float] | None = None
        for record in records or []:
            self._remember(record)

    def _remember(self, record: dict[str, Any]) -> None:
        if self.reference is None:
            for name, value in losses(record).items():
                if math.isfinite(value):
                    self.reference = (f"round {record.get('round', '?')}'s {name}", value)
                    return

    def observe(self, record: dict[str, Any], where: str) -> None:
        """Raise DivergenceError when a loss of ``record`` diverged; ``where`` names the run directory."""
        found = losses(record)
        if self.reference is not None:
            label, reference = self.reference
            for name, value in found.items():
                if not math.isfinite(value) or value > FACTOR * max(reference, FLOOR):
                    times = f", {value / reference:,.0f} times {label} {reference:.3g}" if math.isfinite(value) and reference > 0 else ""
                    raise DivergenceError(
                        f"{name} at round {record.get('round', '?')} is {value:.3g}{times}; the run stopped (its metrics so far are in {where})",
                        "lower train.lr, or clip gradients with train.max_grad_norm",
                    )
        elif any(not math.isfinite(value) for value in found.values()):
            raise DivergenceError(
                f"the loss at round {record.get('round', '?')} is not finite; the run stopped (its metrics so far are in {where})",
                "lower train.lr, or clip gradients with train.max_grad_norm",
            )
        self._remember(record)
