"""HetLoRA: heterogeneous ranks by truncation, self-pruning and sparsity-weighted zero-padding
(Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024).

The server keeps a global adapter (A_g: r_max x k, B_g: d x r_max, scale s_g of rank r_max).
- Distribution by truncation: client k gets A_k = A_g[:r_k], B_k = B_g[:, :r_k] * s_g/s_k.
- Local rank self-pruning: the loss gets lambda * sum_modules ||s_k B_k[:, T] A_k[T, :]||_F,
  T = the last t = max(1, r_k - floor(gamma r_k)) ranks. After training, if that tail norm is
  smaller than at the start of the round (the regulariser won against the task), the client
  prunes it: r_k <- max(min_rank, r_k - t), and uploads only the first r_k components. A pruned
  rank stays pruned (the server sends the pruned rank from then on); the client's live adapter
  keeps its assigned size with zero rows/columns, which receive no gradient.
- Sparsity-weighted aggregation: B_k is brought to the global scale (B_k * s_k/s_g), A_k and B_k
  are zero-padded to r_max (padded rows/columns contribute zero), and per module
  A_g = sum_k w_k A_k, B_g = sum_k w_k B_k with w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F
  (``weighting: norm``, the paper), or proportional to n_k times that norm, or to n_k alone.
  The head is averaged with p_k = n_k / sum n.
Scales: s_k = alpha/r_k differs per rank (alpha/sqrt(r_k) with rsLoRA); rescaling B by s_k/s_g on
the way up and s_g/s_k on the way down makes every client's delta equal to the top-r_k part of
the global delta, s_k B_k A_k = s_g B_g[:, :r_k] A_g[:r_k], so nothing is silently re-scaled.

mixed_ranks "native". not asynchronous: sparsity weights are normalised over a round's
updates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from atoll.algorithms.catalog import HetLoRAParams, SPECS
from atoll.algorithms._lowrank import RankTemplates, frobenius_of_product, truncate
from atoll.fl.base import BaseClient, BaseServer, pad_factors, weighted_average
from atoll.fl.state import AdapterState, LoRAFactors, Update, example_weights
from atoll.fl.trainer import TrainHooks


def tail_size(rank: int, gamma: float) -> int:
    return max(1, rank - math.floor(gamma * rank))


def to_client(global_factors: LoRAFactors, rank: int, client_scale: float) -> LoRAFactors:
    """Truncate the global factors to ``rank`` at the client's scale: s_k B_k A_k = s_g B_g[:, :r] A_g[:r]."""
    part = truncate(global_factors, rank)
    return LoRAFactors(part.A, part.B * (global_factors.scale / client_scale), client_scale)


def to_global(factors: LoRAFactors, global_rank: int, global_scale: float) -> LoRAFactors:
    """A client's factors at the global scale, zero-padded to the global rank (product unchanged)."""
    rescaled = LoRAFactors(factors.A, factors.B * (factors.scale / global_scale), global_scale)
    return pad_factors(rescaled, global_rank)


def sparsity_weights(updates: list[Update], name: str, weighting: str) -> list[float]:
    """Per-module aggregation weights (sum to 1); example weights when every norm is zero."""
    examples = example_weights(updates)
    if weighting == "examples":
        return examples
    norms = [
        float(u.state.lora[name].scale * frobenius_of_product(u.state.lora[name].B.float(), u.state.lora[name].A.float())) for u in updates
    ]
    raw = norms if weighting == "norm" else [n * p for n, p in zip(norms, examples)]
    total = sum(raw)
    if total <= 0:
        return examples
    return [value / total for value in raw]


def tail_norm(state: AdapterState, rank: int, gamma: float) -> float:
    """sum over modules of ||s B[:, T] A[T, :]||_F for the tail T of the first ``rank`` components."""
    tail = slice(rank - tail_size(rank, gamma), rank)
    with torch.no_grad():
        return float(sum(f.scale * frobenius_of_product(f.B[:, tail].float(), f.A[tail].float()) for f in state.lora.values()))


class HetLoRAClient(BaseClient):
    params: HetLoRAParams
    _active_rank: int = 0  # rank the server sent this round (set by compose; transient, not state)

    def compose(self, round: int, download: AdapterState) -> AdapterState:
        self._active_rank = download.rank()
        lora = {name: pad_factors(f.clone(), self.context.rank) for name, f in download.lora.items()}
        return AdapterState(lora, {n: t.clone() for n, t in download.extra.items()})

    def hooks(self, round: int, start: AdapterState) -> TrainHooks:
        if self.params.prune_lambda <= 0:
            return TrainHooks()
        rank = self._active_rank
        tail = slice(rank - tail_size(rank, self.params.prune_gamma), rank)
        live = list(self.workbench.active.lora.values())
        weight = self.params.prune_lambda

        def regulariser() -> Tensor:
            return weight * sum(scale * frobenius_of_product(B[:, tail], A[tail]) for A, B, scale in live)

        return TrainHooks(extra_loss=regulariser)

    def upload(self, round: int, start: AdapterState, trained: AdapterState) -> AdapterState:
        rank = self._active_rank
        if self.params.prune_lambda > 0 and rank > self.params.min_rank:
            gamma = self.params.prune_gamma
            if tail_norm(trained, rank, gamma) < tail_norm(start, rank, gamma):
                rank = max(self.params.min_rank, rank - tail_size(rank, gamma))
        return AdapterState({name: truncate(f, rank) for name, f in trained.lora.items()}, trained.extra)


class HetLoRA(BaseServer):
    spec = SPECS["hetlora"]
    client_class = HetLoRAClient

    def __init__(self, context, params):
        super().__init__(context, params)
        self.templates = RankTemplates(context.initial_state)
        self.global_rank = max(context.client_ranks) if context.client_ranks else context.config.model.lora.rank
        self.global_state = self.templates(self.global_rank).clone()
        self.current_ranks = list(context.client_ranks)  # after self-pruning

    def configure(self, round: int, client_id: int) -> AdapterState:
        assigned = self.context.client_ranks[client_id]
        rank = self.current_ranks[client_id]
        template = self.templates(assigned)
        lora = {name: to_client(f, rank, template.lora[name].scale) for name, f in self.global_state.lora.items()}
        return AdapterState(lora, dict(self.global_state.extra))

    def aggregate(self, round: int, updates: list[Update]) -> None:
        if not updates:
            return
        lora = {}
        for name, current in self.global_state.lora.items():
            weights = sparsity_weights(updates, name, self.params.weighting)
            padded = [to_global(u.state.lora[name], self.global_rank, current.scale) for u in updates]
            lora[name] = LoRAFactors(
                weighted_average([f.A for f in padded], weights),
                weighted_average([f.B for f in padded], weights),
                current.scale,
            )
        examples = example_weights(updates)
        extra = {name: weighted_average([u.state.extra[name] for u in updates], examples) for name in self.global_state.extra}
        self.global_state = AdapterState(lora, extra)
        for update in updates:
            if update.client_id >= 0:
                self.current_ranks[update.client_id] = update.state.rank()

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        tensors = super().state_dict()
        tensors["hetlora/current_ranks"] = torch.tensor(self.current_ranks, dtype=torch.int64)
        return tensors

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        super().load_state_dict(tensors)
        self.current_ranks = [int(r) for r in tensors["hetlora/current_ranks"]]
