"""FedProx: FedAvg with a proximal term in every client's loss (Li et al., "Federated Optimization
in Heterogeneous Networks", MLSys 2020).

Client k minimises  F_k(w) + mu/2 * ||w - w_t||^2  over the tensors it trains (LoRA A, B and any
head), where w_t is the adapter it downloaded; the proximal gradient is mu * (w - w_t). The server
is FedIT's: w_{t+1} = sum_k p_k w_k with p_k = n_k / sum n. With mu = 0 the method is FedIT.
Inexact like FedIT: s * mean(B) mean(A) != mean(s B_k A_k) in general.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from atoll.algorithms.catalog import SPECS
from atoll.fl.base import BaseClient, BaseServer
from atoll.fl.state import AdapterState
from atoll.fl.trainer import TrainHooks
from atoll.fl.workbench import Trainable
from atoll.models.adapters import LiveAdapter


def anchored_parameters(live: LiveAdapter, start: AdapterState, trainable: Trainable) -> list[tuple[nn.Parameter, Tensor]]:
    """(live trained parameter, detached float32 copy of its downloaded value) for every tensor the
    client trains: the anchors of the proximal term."""
    pairs: list[tuple[nn.Parameter, Tensor]] = []
    for name, (a, b, _) in live.lora.items():
        factors = start.lora[name]
        if trainable.lora_A:
            pairs.append((a, factors.A.detach().float().clone()))
        if trainable.lora_B:
            pairs.append((b, factors.B.detach().float().clone()))
    if trainable.extra:
        for name, param in live.extra.items():
            if name in start.extra:
                pairs.append((param, start.extra[name].detach().float().clone()))
    return pairs


def proximal_loss(pairs: list[tuple[nn.Parameter, Tensor]], mu: float) -> Tensor:
    """mu/2 * sum ||w - w_anchor||^2, differentiable in w (its gradient is mu * (w - w_anchor))."""
    total = torch.zeros((), dtype=torch.float32)
    for param, anchor in pairs:
        total = total + (param.float() - anchor).pow(2).sum()
    return 0.5 * mu * total


class FedProxClient(BaseClient):
    def hooks(self, round: int, start: AdapterState) -> TrainHooks:
        mu = float(self.params.mu)
        if mu == 0.0:
            return TrainHooks()  # exactly FedIT: no term, not even a zero one
        pairs = anchored_parameters(self.workbench.active, start, self.trainable(round))
        return TrainHooks(extra_loss=lambda: proximal_loss(pairs, mu))


class FedProx(BaseServer):
    """FedIT's server with FedProx clients. Mixed ranks are refused (FedIT's factor averaging needs
    one shape). Asynchronous use is fine: the anchor is whatever adapter the client downloaded, so a
    stale download only changes the anchor, and the server is FedIT's weighted average."""

    spec = SPECS["fedprox"]
    client_class = FedProxClient
