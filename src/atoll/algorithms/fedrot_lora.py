"""FedRot-LoRA: rotate each client's factors into the global's frame before FedAvg (Zhang, Kim,
Cha, Vikalo, "FedRot-LoRA: Mitigating Rotational Misalignment in Federated LoRA", ICML 2026,
arXiv:2602.23638).

B A = (B R)(R^T A) for any orthogonal R, so clients can report the same update in different
latent frames, and averaging misaligned factors cancels. Before upload, client k picks
R* in SO(r) by orthogonal Procrustes against the global factor it downloaded,
    A-rounds (odd):  R* = argmin ||R^T A_k - A_g||_F  = proj_SO(A_k A_g^T),
    B-rounds (even): R* = argmin ||B_k R - B_g||_F    = proj_SO(B_k^T B_g),
softens it, R = proj_SO((1 - lambda) I + lambda R*), and uploads (R^T A_k, B_k R): the same
s B_k A_k. proj_SO(M) = U diag(1, .., 1, det(U V^T)) V^T for M = U S V^T (Kabsch), so R^T R = I
and det R = +1; lambda = 0 gives R = I (plain FedIT). Server: FedAvg (FedIT), inexact in general,
but rotations remove the part of the gap s B_bar A_bar - mean(s B_k A_k) caused by frames only:
clients that hold rotated copies of one update are averaged back to that update exactly.
"""

from __future__ import annotations


import torch
from torch import Tensor

from atoll.algorithms.catalog import SPECS
from atoll.fl.base import BaseClient, BaseServer
from atoll.fl.state import AdapterState, LoRAFactors


def project_so(matrix: Tensor) -> Tensor:
    """The rotation nearest to ``matrix`` (maximises tr(R^T M) over SO(r)), in float64."""
    U, _, Vh = torch.linalg.svd(matrix.double())
    sign = torch.ones(U.shape[1], dtype=torch.float64)
    sign[-1] = torch.sign(torch.linalg.det(U @ Vh))
    return (U * sign) @ Vh


def rotation(factors: LoRAFactors, reference: LoRAFactors, factor: str, strength: float) -> Tensor:
    """R in SO(r) (float64) aligning ``factors`` to ``reference`` on factor 'A' or 'B', softened by
    ``strength``. Identity when there is nothing to align to (a zero reference, e.g. B at init)."""
    rank = factors.rank
    identity = torch.eye(rank, dtype=torch.float64)
    if factor == "A":
        cross = factors.A.double() @ reference.A.double().T
    else:
        cross = factors.B.double().T @ reference.B.double()
    if strength == 0.0 or not torch.isfinite(cross).all() or float(torch.linalg.matrix_norm(cross)) == 0.0:
        return identity
    target = project_so(cross)
    return project_so((1.0 - strength) * identity + strength * target)


def aligned_factor(round: int, align: str) -> str:
    if align != "alternate":
        return align
    return "A" if round % 2 == 1 else "B"


def rotate(factors: LoRAFactors, R: Tensor) -> LoRAFactors:
    """(R^T A, B R): the same product B A in another frame."""
    return LoRAFactors((R.T @ factors.A.double()).to(factors.A.dtype), (factors.B.double() @ R).to(factors.B.dtype), factors.scale)


def align_state(trained: AdapterState, reference: AdapterState, factor: str, strength: float) -> AdapterState:
    """``trained`` with every module rotated toward ``reference`` (unchanged when strength is 0)."""
    if strength == 0.0:
        return trained
    lora = {name: rotate(f, rotation(f, reference.lora[name], factor, strength)) for name, f in trained.lora.items()}
    return AdapterState(lora, trained.extra, trained.base)


class FedRotLoRAClient(BaseClient):
    def upload(self, round: int, start: AdapterState, trained: AdapterState) -> AdapterState:
        factor = aligned_factor(round, self.params.align)
        return align_state(trained, start, factor, float(self.params.strength))


class FedRotLoRA(BaseServer):
    """FedIT's server with rotation-aligning clients. Mixed ranks are refused (R is r x r and the
    server averages factors of one shape). Asynchronous use is fine: the rotation never changes a
    client's product, and aligning to an older global only aligns less well."""

    spec = SPECS["fedrot-lora"]
    client_class = FedRotLoRAClient
