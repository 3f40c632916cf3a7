"""Update validation as a receive stage: a bad update is dropped with its client id and the reason,
and the round goes on with the others (in place of the default finiteness check, which stops the
run).

Every part of an upload is checked against what the client was sent: its download, completed by
the seeded initial adapter of the client's rank for parts an algorithm's download leaves out
(FLoRA's clients start from a fresh adapter): a known part, the expected shape and dtype, finite
values, and with ``robust.validation.max_norm`` the L2 norm of each part's change. Control data and
base deltas are checked for finite values. The checks are :mod:`atoll.privacy.validation`'s.
"""

from __future__ import annotations

import torch

from atoll.fl.stages import Stage
from atoll.fl.state import AdapterState, Update
from atoll.privacy.validation import check_update, expected_parts


class UpdateValidation(Stage):
    """Drop malformed or oversized updates (see the module docstring)."""

    name = "validate"

    def __init__(self, server, max_norm: float | None):
        self.server = server
        self.max_norm = max_norm
        self._initial: dict[int, dict[str, torch.Tensor]] = {}

    def reference(self, round: int, client_id: int) -> dict[str, torch.Tensor]:
        """The model tensors ``client_id`` started from this round."""
        rank = self.server.context.client_ranks[client_id]
        if rank not in self._initial:
            self._initial[rank] = self.server.context.initial_state(rank).model_tensors()
        reference = dict(self._initial[rank])
        reference.update(self.server.configure(round, client_id).model_tensors())
        return reference

    def on_receive(self, round: int, update: Update) -> str | None:
        state = update.state
        others = {f"control.{k}": t for k, t in state.control.items()} | {f"base.{k}": t for k, t in state.base.items()}
        for key, tensor in others.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"part '{key}' has NaN or Inf values"
        if update.client_id < 0:  # a mean computed by a protection or a pooled baseline: finiteness only
            return check_finite_parts(state)
        reference = self.reference(round, update.client_id)
        tensors = state.model_tensors()
        expected = {key: part for key, part in expected_parts(reference).items() if key in tensors}
        reason = check_update(tensors, expected)
        if reason is None and self.max_norm is not None:
            for key in sorted(tensors):
                change = float(torch.linalg.vector_norm(tensors[key].to(torch.float64) - reference[key].to(torch.float64)))
                if change > self.max_norm:
                    return f"part '{key}' changed by L2 norm {change:.4g}, above robust.validation.max_norm {self.max_norm:g}"
        return reason


def check_finite_parts(state: AdapterState) -> str | None:
    for key, tensor in state.model_tensors().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"part '{key}' has NaN or Inf values"
    return None
