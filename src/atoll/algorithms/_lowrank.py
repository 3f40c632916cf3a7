"""The shared low-rank linear algebra of the algorithms (not an algorithm: the leading underscore
marks a helper module). Exact factorisations of products L @ R without forming the dense d x k
matrix, stacking of clients' factors, truncation, PEFT's A initialisation, per-rank templates.

Aggregating LoRA products sum_k p_k s_k B_k A_k equals one product of stacked factors
[B_1 ... B_K] @ [p_1 s_1 A_1; ...; p_K s_K A_K], whose rank is at most sum_k r_k. Working on the
factors costs O((d + k) m^2) for inner size m instead of O(d k min(d, k)) for a dense SVD, and is
exact (not randomised). Factorisations run in float64; callers cast back.

Partial messages (one factor left out) are a property of the message type itself:
:meth:`atoll.fl.state.AdapterState.without` and :meth:`~atoll.fl.state.AdapterState.completed`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from atoll.fl.state import AdapterState, LoRAFactors

# -- ranks and scales ---------------------------------------------------------------------------------


class RankTemplates:
    """The seeded initial adapter of each rank (from ``ServerContext.initial_state``), cached; its
    scale (alpha/r, or alpha/sqrt(r) with rsLoRA) is the one the live PEFT adapter of that rank uses."""

    def __init__(self, initial_state):
        self._initial_state = initial_state
        self._cache: dict[int, AdapterState] = {}

    def __call__(self, rank: int) -> AdapterState:
        if rank not in self._cache:
            self._cache[rank] = self._initial_state(rank)
        return self._cache[rank]


# -- stacking and exact factorisations -----------------------------------------------------------------


def stack(factors: list[LoRAFactors], weights: list[float], dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """B_stack = [B_1, ..., B_K] (d x sum r_k), A_stack = [w_1 s_1 A_1; ...] (sum r_k x k) in
    ``dtype``, so that B_stack @ A_stack = sum_k w_k s_k B_k A_k (each client's own scale; ranks
    may differ). float32 where the stacks are kept or merged (FLoRA, FlexLoRA, FedEx-LoRA),
    float64 where they are factorised at once (FedMomentum, ILoRA)."""
    B_stack = torch.cat([f.B.to(dtype) for f in factors], dim=1)
    A_stack = torch.cat([(float(w) * float(f.scale)) * f.A.to(dtype) for f, w in zip(factors, weights)], dim=0)
    return B_stack, A_stack


def lowrank_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of left @ right (d x m times m x k) without forming it: QR of both factors and an
    SVD of the small core, in float64. U (d x q), S (q, descending), Vh (q x k) with
    U diag(S) Vh = left @ right and q = min(d, m, k)."""
    q_left, r_left = torch.linalg.qr(left.double())
    q_right, r_right = torch.linalg.qr(right.double().T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    return q_left @ u, s, vh @ q_right.T


def truncated_qr(left: Tensor, right: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The first ``rank`` columns of Q and rows of R in a QR decomposition of M = left @ right:
    Q_r (d x rank, orthonormal columns) and R_r = Q_r^T M (rank x k), so Q_r R_r is the projection
    of M onto the span of its first ``rank`` columns (Householder QR: Q_r depends only on them)."""
    left = left.double()
    right = right.double()
    q, _ = torch.linalg.qr(left @ right[:, :rank])
    return q, (q.T @ left) @ right


def frobenius_of_product(B: Tensor, A: Tensor) -> Tensor:
    """||B A||_F from the r x r Gram matrices (cheap for r << d, k; differentiable, finite at 0)."""
    squared = ((B.T @ B) * (A @ A.T)).sum().clamp_min(0.0)
    return torch.sqrt(squared + 1e-20)


def truncate(factors: LoRAFactors, rank: int) -> LoRAFactors:
    """The first ``rank`` rank-1 components: A[:rank], B[:, :rank] (same scale)."""
    return LoRAFactors(factors.A[:rank].clone(), factors.B[:, :rank].clone(), factors.scale)


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """PEFT's LoRA A init, kaiming_uniform_(a=sqrt(5)) on a rows x cols weight: U(-1/sqrt(cols), 1/sqrt(cols))."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2.0 - 1.0) * bound
