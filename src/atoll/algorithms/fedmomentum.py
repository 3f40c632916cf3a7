"""FedMomentum: SVD aggregation that keeps the LoRA factors training and merges the residual into
the base (Yan, Hua, Wang, Zhang, Wu, Song, Guan, "FedMomentum: Preserving LoRA Training Momentum in
Federated Fine-Tuning", arXiv:2603.08014, 2026).

Server: Delta W = sum_k p_k s_k B_k A_k (the exact average of the clients' adapters, WITH their
scales), Delta W = U S V^T. The top r components become the new LoRA with a balanced split
    B = U_r S_r^{1/2} / sqrt(s),   A = S_r^{1/2} V_r^T / sqrt(s)     (s B A = U_r S_r V_r^T, B^T B = A A^T),
and components r+1..r_eff, where r_eff is the smallest count whose cumulative energy
sum_{i<=r_eff} S_i^2 / sum S^2 reaches tau, are merged into the base: base += U S V^T restricted to
those components. So s B A + merged residual = the rank-max(r, r_eff) truncation of Delta W; only
the tail beyond r_eff (at most 1 - tau of the energy) is dropped. tau = 1 keeps everything: exact.
The SVD is exact and runs on the stacked factors (rank <= sum_k r_k), never on a dense d x k matrix.
Heads: FedAvg.
"""

from __future__ import annotations

import torch
from torch import Tensor

from atoll.algorithms.catalog import SPECS
from atoll.algorithms._lowrank import lowrank_svd, stack
from atoll.errors import UpdateError
from atoll.fl.base import BaseClient, BaseServer, weighted_average
from atoll.fl.state import AdapterState, LoRAFactors, Update, example_weights


def effective_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest count n with sum_{i<n} S_i^2 >= energy * sum S^2 (0 for a zero matrix)."""
    squares = singular_values.double() ** 2
    total = float(squares.sum())
    if total <= 0.0:
        return 0
    shares = torch.cumsum(squares, 0) / total
    reached = torch.nonzero(shares >= energy - 1e-12)
    return int(reached[0]) + 1 if len(reached) else int(len(singular_values))


def momentum_split(
    factors: list[LoRAFactors], weights: list[float], rank: int, scale: float, energy: float
) -> tuple[LoRAFactors, Tensor | None, int]:
    """(new balanced LoRA factors, dense residual merged into the base or None, r_eff) for one module."""
    left, right = stack(factors, weights, torch.float64)
    U, S, Vh = lowrank_svd(left, right)
    if S.numel() < rank:
        raise ValueError(f"rank {rank} exceeds the layer's dimensions {left.shape[0]} x {right.shape[1]}")
    r_eff = effective_rank(S, energy)
    root = (S[:rank] / scale).sqrt()
    A = (root[:, None] * Vh[:rank]).to(factors[0].A.dtype)
    B = (U[:, :rank] * root).to(factors[0].B.dtype)
    residual = None
    if r_eff > rank:
        residual = ((U[:, rank:r_eff] * S[rank:r_eff]) @ Vh[rank:r_eff]).float()
    return LoRAFactors(A, B, scale), residual, r_eff


class FedMomentumClient(BaseClient):
    def upload(self, round: int, start: AdapterState, trained: AdapterState) -> AdapterState:
        # the merged base came from the server and is unchanged by training: do not send it back
        return AdapterState(trained.lora, trained.extra)


class FedMomentum(BaseServer):
    """Mixed ranks are refused (the balanced split targets one rank). Not asynchronous: the residual
    merged into the base each round assumes every update started from the current base."""

    spec = SPECS["fedmomentum"]
    client_class = FedMomentumClient

    def __init__(self, context, params):
        super().__init__(context, params)
        self.effective_ranks: dict[str, int] = {}

    def aggregate(self, round: int, updates: list[Update]) -> None:
        if not updates:
            return
        weights = example_weights(updates)
        lora: dict[str, LoRAFactors] = {}
        base = dict(self.global_state.base)
        for name, current in self.global_state.lora.items():
            factors = [u.state.lora[name] if name in u.state.lora else None for u in updates]
            for update, f in zip(updates, factors):
                if f is None or f.A.shape != current.A.shape or f.B.shape != current.B.shape:
                    raise UpdateError(f"client {update.client_id} sent no LoRA factors of '{name}' in the global's shape")
            lora[name], residual, self.effective_ranks[name] = momentum_split(
                factors, weights, current.rank, current.scale, float(self.params.energy)
            )
            if residual is not None:
                base[name] = residual if name not in base else base[name].float() + residual
        extra = {name: weighted_average([u.state.extra[name] for u in updates], weights) for name in self.global_state.extra}
        self.global_state = AdapterState(lora, extra, base)
