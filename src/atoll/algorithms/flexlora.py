"""FlexLoRA: full-size aggregation, per-client SVD redistribution (Bai et al., "Federated
Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources",
NeurIPS 2024).

Server: dW = sum_k p_k (alpha/r_k) B_k A_k (each client's own scale; ranks may differ).
For a client of rank r_k, with dW = U S V^T:
    B_k = U[:, :r_k] S[:r_k] / (alpha/r_k),   A_k = V[:, :r_k]^T,
so (alpha/r_k) B_k A_k is the best rank-r_k approximation of dW (Eckart-Young) and exactly dW
when rank(dW) <= r_k. The SVD is taken of the stacked product without forming dW (QR of both
stacks, SVD of a small core; float64). Where dW has fewer than r_k singular directions, the
missing rows of A_k come from the seeded initial A of that rank (B columns zero), so every rank
stays trainable. The head is averaged with p_k.

The global model is dW itself: ``global_state`` holds the best rank-r_max approximation as a
PEFT adapter plus the dense remainder dW - (alpha/r_max) B A in ``base``, so its effective delta
is dW exactly (r_max = the largest client rank).

mixed_ranks "native". not asynchronous: dW is the weighted sum of one round's full
adapters and replaces the previous one; it is not defined one update at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from atoll.algorithms.catalog import SPECS
from atoll.algorithms._lowrank import RankTemplates, lowrank_svd, stack
from atoll.fl.base import BaseServer, weighted_average
from atoll.fl.state import AdapterState, LoRAFactors, Update, example_weights


def svd_factors(U: Tensor, S: Tensor, Vh: Tensor, rank: int, scale: float, fallback: LoRAFactors) -> LoRAFactors:
    """B = U_r S_r / scale, A = Vh_r (so scale * B A = U_r S_r Vh_r); rows beyond the available
    singular directions take A from ``fallback`` with zero B columns."""
    available = min(rank, S.shape[0])
    B = (U[:, :available] * S[:available]) / scale
    A = Vh[:available]
    if available < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - available)], 1)
        A = torch.cat([A, fallback.A[available:rank].to(A.dtype)], 0)
    return LoRAFactors(A.to(fallback.A.dtype).contiguous(), B.to(fallback.B.dtype).contiguous(), scale)


class FlexLoRA(BaseServer):
    spec = SPECS["flexlora"]

    def __init__(self, context, params):
        super().__init__(context, params)
        self.templates = RankTemplates(context.initial_state)
        self.global_rank = max(context.client_ranks) if context.client_ranks else context.config.model.lora.rank
        self.stacks: dict[str, tuple[Tensor, Tensor]] = {}  # module -> (B_stack, A_stack), B_stack A_stack = dW
        self.svd: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.head: dict[str, Tensor] = dict(self.global_state.extra)

    def delta(self, name: str) -> Tensor:
        """The aggregated dense update dW of module ``name`` (float32)."""
        B_stack, A_stack = self.stacks[name]
        return B_stack @ A_stack

    def factors_for_rank(self, rank: int) -> AdapterState:
        template = self.templates(rank)
        if not self.stacks:
            return AdapterState({n: f.clone() for n, f in template.lora.items()}, {n: t.clone() for n, t in self.head.items()})
        lora = {name: svd_factors(*self.svd[name], rank, template.lora[name].scale, template.lora[name]) for name in template.lora}
        return AdapterState(lora, {n: t.clone() for n, t in self.head.items()})

    def configure(self, round: int, client_id: int) -> AdapterState:
        return self.factors_for_rank(self.context.client_ranks[client_id])

    def aggregate(self, round: int, updates: list[Update]) -> None:
        if not updates:
            return
        weights = example_weights(updates)
        names = sorted(self.templates(self.global_rank).lora)
        self.stacks = {name: stack([u.state.lora[name] for u in updates], weights) for name in names}
        self.head = {name: weighted_average([u.state.extra[name] for u in updates], weights) for name in self.head}
        self._refresh()

    def _refresh(self) -> None:
        """SVDs of dW and the global state (best rank-r_max adapter + dense remainder)."""
        self.svd = {name: lowrank_svd(*parts) for name, parts in self.stacks.items()}
        approx = self.factors_for_rank(self.global_rank)
        remainder = {name: self.delta(name) - approx.lora[name].delta() for name in self.stacks}
        self.global_state = AdapterState(approx.lora, approx.extra, remainder)

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        tensors = super().state_dict()
        for name, (B_stack, A_stack) in self.stacks.items():
            tensors[f"flexlora/B/{name}"] = B_stack
            tensors[f"flexlora/A/{name}"] = A_stack
        return tensors

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        super().load_state_dict(tensors)
        self.head = dict(self.global_state.extra)
        B = {k[len("flexlora/B/") :]: v for k, v in tensors.items() if k.startswith("flexlora/B/")}
        A = {k[len("flexlora/A/") :]: v for k, v in tensors.items() if k.startswith("flexlora/A/")}
        self.stacks = {name: (B[name], A[name]) for name in sorted(B)}
        if self.stacks:
            self._refresh()
