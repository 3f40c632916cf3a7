"""FedSVD: train B only, re-factorise B A by SVD every round (Lee, Park, Lee, Wagner, Seong,
Bocklet, Lee, Hwang, "FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA",
NeurIPS 2025).

Clients train B (and the head) with A frozen at the downloaded global A, and upload B only.
Server: B_bar = sum_k p_k B_k;  SVD(B_bar A) = U S V^T;  A <- V_r^T;  B <- U_r S_r.
Exact: every client multiplies the same A, so s * B_bar A = sum_k p_k s B_k A, and the SVD of a
rank-r product re-factorises it without loss: B_new A_new = B_bar A, with A_new A_new^T = I_r
(the orthonormal A bounds B's gradient norm, which is the paper's point under DP-SGD).
The SVD works on the factors (QR of B_bar and A^T, SVD of an r x r core), never on a dense d x k
matrix, and no client ever holds more than its adapter (no model-state clones).
"""

from __future__ import annotations

from torch import Tensor

from atoll.algorithms.catalog import SPECS
from atoll.algorithms._lowrank import lowrank_svd
from atoll.errors import UpdateError
from atoll.fl.base import BaseClient, BaseServer, weighted_average
from atoll.fl.state import AdapterState, LoRAFactors, Update, example_weights
from atoll.fl.workbench import Trainable


def refactorize(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """(A_new, B_new) with B_new A_new = B A, A_new = V_r^T (orthonormal rows), B_new = U_r S_r."""
    rank = int(A.shape[0])
    if rank > min(B.shape[0], A.shape[1]):
        raise ValueError(f"rank {rank} exceeds the layer's dimensions {B.shape[0]} x {A.shape[1]}")
    U, S, Vh = lowrank_svd(B, A)
    return Vh[:rank].to(A.dtype), (U[:, :rank] * S[:rank]).to(B.dtype)


class FedSVDClient(BaseClient):
    def trainable(self, round: int) -> Trainable:
        return Trainable(lora_A=False)

    def upload(self, round: int, start: AdapterState, trained: AdapterState) -> AdapterState:
        return trained.without("A")  # B and the head; A never leaves the server


class FedSVD(BaseServer):
    """Mixed ranks are refused: clients must multiply one shared A. Not asynchronous: A is replaced
    every round, so a B trained against an earlier A no longer matches it."""

    spec = SPECS["fedsvd"]
    client_class = FedSVDClient

    def aggregate(self, round: int, updates: list[Update]) -> None:
        if not updates:
            return
        weights = example_weights(updates)
        for update in updates:
            for name, factors in self.global_state.lora.items():
                sent = update.state.lora.get(name)
                if sent is None or sent.B is None:
                    raise UpdateError(f"client {update.client_id} sent no B of '{name}'")
                if sent.B.shape != factors.B.shape:
                    raise UpdateError(
                        f"client {update.client_id} sent B of '{name}' with shape {tuple(sent.B.shape)}, expected {tuple(factors.B.shape)}"
                    )
            missing = [key for key in self.global_state.extra if key not in update.state.extra]
            if missing:
                raise UpdateError(f"client {update.client_id} sent no '{missing[0]}'")
        lora = {}
        for name, factors in self.global_state.lora.items():
            B_bar = weighted_average([u.state.lora[name].B for u in updates], weights)
            A, B = refactorize(B_bar, factors.A)
            lora[name] = LoRAFactors(A, B, factors.scale)
        extra = {name: weighted_average([u.state.extra[name] for u in updates], weights) for name in self.global_state.extra}
        self.global_state = AdapterState(lora, extra, dict(self.global_state.base))
