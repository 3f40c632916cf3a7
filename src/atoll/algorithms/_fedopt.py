"""Server optimisers on the pseudo-gradient (shared by fedavgm, fedadam, fedyogi, fedadagrad).

Each round the server forms Delta = sum_k p_k x_k - x for every LoRA factor and head tensor (never
the scales alpha/r) and lets an optimiser turn it into a step; its moments are per tensor, kept in
float32, and checkpointed through ``state_dict`` so a resumed run continues exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from atoll.fl.base import BaseServer, average_states
from atoll.fl.state import AdapterState, Update, example_weights

MOMENT = "fedopt."  # state_dict prefix: fedopt.<moment>.<tensor key>


def optimised_keys(state: AdapterState) -> list[str]:
    """Keys of ``state.to_tensors()`` the server optimiser moves: A, B and extras, not scales or
    merged base deltas."""
    keys = [f"lora.{name}.{part}" for name in state.lora for part in ("A", "B")]
    keys += [f"extra.{name}" for name in state.extra]
    return sorted(keys)


class ServerOptimizer(BaseServer):
    """x <- x + step(Delta) per tensor; subclasses define ``moment_names``, ``initial`` and ``step``.

    Mixed ranks are refused: a pseudo-gradient needs every client's factor in the global's shape.
    Not asynchronous: Delta is measured from the current x, so an update that started from an
    older x would be credited with changes it never made."""

    moment_names: tuple[str, ...] = ()

    def __init__(self, context, params):
        super().__init__(context, params)
        tensors = self.global_state.to_tensors()
        self.moments: dict[str, dict[str, Tensor]] = {
            moment: {key: self.initial(moment, tensors[key]) for key in optimised_keys(self.global_state)} for moment in self.moment_names
        }

    def initial(self, moment: str, like: Tensor) -> Tensor:
        return torch.zeros_like(like, dtype=torch.float32)

    def step(self, key: str, delta: Tensor) -> Tensor:
        """The change applied to tensor ``key`` given its pseudo-gradient ``delta`` (float32)."""
        raise NotImplementedError

    def aggregate(self, round: int, updates: list[Update]) -> None:
        if not updates:
            return
        averaged = average_states([u.state for u in updates], example_weights(updates), base=self.global_state)
        old = self.global_state.to_tensors()
        new = averaged.to_tensors()
        for key in optimised_keys(self.global_state):
            start = old[key].float()
            new[key] = (start + self.step(key, new[key].float() - start)).to(old[key].dtype)
        self.global_state = AdapterState.from_tensors(new)

    def state_dict(self) -> dict[str, Tensor]:
        tensors = super().state_dict()
        for moment, values in self.moments.items():
            tensors.update({f"{MOMENT}{moment}.{key}": value for key, value in values.items()})
        return tensors

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        super().load_state_dict(tensors)
        for moment, values in self.moments.items():
            for key in values:
                values[key] = tensors[f"{MOMENT}{moment}.{key}"].float().clone()


class AdaptiveServerOptimizer(ServerOptimizer):
    """Reddi et al.'s Algorithm 2: m <- b1 m + (1 - b1) Delta; v <- second_moment(v, Delta^2);
    x <- x + eta * m / (sqrt(v) + tau), with m_0 = 0 and v_0 = tau^2 (the paper asks v_{-1} >= tau^2;
    no bias correction, as in the paper)."""

    moment_names = ("m", "v")

    def initial(self, moment: str, like: Tensor) -> Tensor:
        value = float(self.params.tau) ** 2 if moment == "v" else 0.0
        return torch.full_like(like, value, dtype=torch.float32)

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, key: str, delta: Tensor) -> Tensor:
        beta1 = float(self.params.beta1)
        m = beta1 * self.moments["m"][key] + (1.0 - beta1) * delta
        v = self.second_moment(self.moments["v"][key], delta * delta)
        self.moments["m"][key] = m
        self.moments["v"][key] = v
        return float(self.params.server_lr) * m / (v.sqrt() + float(self.params.tau))
