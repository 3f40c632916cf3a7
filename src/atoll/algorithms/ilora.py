"""ILoRA: QR-initialised federated LoRA with concatenated-QR aggregation (Zhou, Liu, Shang, "ILoRA:
Federated Learning with Low-Rank Adaptation for Heterogeneous Client Aggregation",
arXiv:2511.16069, 2025).

Init (per module, from the pristine weight W0 = Q R):  B = Q_{:, :r},  A = R_{:r, :} / s,  and the
base becomes W0 - s B A = W0 - Q_r R_r, so the effective weight W0 + base + s B A is W0 exactly
and every client starts in the same orthonormal subspace (B^T B = I_r).
Server: stack [B_1 ... B_K] and [p_1 s_1 A_1; ...; p_K s_K A_K], whose product is exactly
Delta = sum_k p_k s_k B_k A_k; then QR(Delta) -> B = Q_{:, :r}, A = R_{:r, :} / s (the scale is
divided out so s B A = Q_r R_r), and B^T B = I_r again. Heads: FedAvg. The base stays W0 - Q_r R_r.
Exact only when Delta's columns lie in the span of its first r columns (e.g. rank(Delta) <= r, as
when clients share B): truncated QR keeps the projection Q_r Q_r^T Delta, not the best rank-r
approximation, and drops the rest.

The paper's third part, AdamW with rank-aware control variates, is not implemented here.
The base delta is a pure function of W0: server and clients each compute it (QR of W0's first r
columns, cached per process), so it is never sent (downloads and uploads carry A, B and heads).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from atoll.algorithms.catalog import SPECS
from atoll.algorithms._lowrank import stack, truncated_qr
from atoll.errors import ConfigError, UpdateError
from atoll.fl.base import BaseClient, BaseServer, weighted_average
from atoll.fl.state import AdapterState, LoRAFactors, Update, example_weights


def qr_init(W0: Tensor, rank: int, scale: float) -> tuple[LoRAFactors, Tensor]:
    """(LoRA factors B = Q_r, A = R_r / s, base delta -Q_r R_r) for a weight W0 (out x in)."""
    if rank > min(W0.shape):
        raise ConfigError(f"LoRA rank {rank} exceeds the weight's dimensions {tuple(W0.shape)}", "lower model.lora.rank")
    W = W0.double()
    Q, _ = torch.linalg.qr(W[:, :rank])  # Householder QR: Q_{:, :r} depends on the first r columns only
    R = Q.T @ W
    factors = LoRAFactors((R / scale).to(W0.dtype), Q.to(W0.dtype), scale)
    return factors, (-(Q @ R)).float()


def qr_aggregate(factors: list[LoRAFactors], weights: list[float], rank: int, scale: float) -> LoRAFactors:
    """B = Q_r, A = R_r / s from the truncated QR of sum_k p_k s_k B_k A_k (never formed densely)."""
    left, right = stack(factors, weights, torch.float64)
    Q, R = truncated_qr(left, right, rank)
    return LoRAFactors((R / scale).to(factors[0].A.dtype), Q.to(factors[0].B.dtype), scale)


def initial_state(state: AdapterState, base_weight) -> AdapterState:
    """``state`` with every module QR-initialised from ``base_weight(name)`` and the base deltas set."""
    lora, base = {}, {}
    for name, factors in state.lora.items():
        W0 = base_weight(name)
        if tuple(W0.shape) != (factors.B.shape[0], factors.A.shape[1]):
            raise ConfigError(f"ilora needs out x in weights; '{name}' has {tuple(W0.shape)}", "use a model with nn.Linear layers")
        lora[name], base[name] = qr_init(W0, factors.rank, factors.scale)
    return AdapterState(lora, dict(state.extra), base)


_BASE_CACHE: "weakref.WeakKeyDictionary[object, dict[tuple, Tensor]]" = weakref.WeakKeyDictionary()


class ILoRAClient(BaseClient):
    def base_deltas(self, download: AdapterState) -> dict[str, Tensor]:
        """-Q_r R_r per module from this process's own W0 (public, deterministic; cached)."""
        cache = _BASE_CACHE.setdefault(self.workbench, {})
        deltas = {}
        for name, factors in download.lora.items():
            key = (name, factors.rank, factors.scale)
            if key not in cache:
                cache[key] = initial_state(AdapterState({name: factors}), self.workbench.base.pristine).base[name]
            deltas[name] = cache[key]
        return deltas

    def compose(self, round: int, download: AdapterState) -> AdapterState:
        return AdapterState(download.lora, download.extra, self.base_deltas(download))

    def upload(self, round: int, start: AdapterState, trained: AdapterState) -> AdapterState:
        return AdapterState(trained.lora, trained.extra)  # the base is W0's, never sent


class ILoRA(BaseServer):
    """Mixed ranks are refused: the paper truncates the global QR to each client's r_k, but its
    base W0 - B_k A_k then differs per rank and the global model is left undefined. Sync only: the
    generic asynchronous rules mix A and B factor by factor, which breaks B^T B = I and is not
    ILoRA's product-space aggregation (a product-space rule, qr_aggregate over [global, x_k] with
    weights [1 - a, a], would be the natural extension)."""

    spec = SPECS["ilora"]
    client_class = ILoRAClient

    def __init__(self, context, params):
        super().__init__(context, params)
        if context.base_weight is None:
            raise ConfigError("ilora needs the base weights to initialise its adapter (ServerContext.base_weight)")
        self.global_state = initial_state(self.global_state, context.base_weight)

    def configure(self, round: int, client_id: int) -> AdapterState:
        return AdapterState(self.global_state.lora, self.global_state.extra)  # clients rebuild the base from W0

    def aggregate(self, round: int, updates: list[Update]) -> None:
        if not updates:
            return
        weights = example_weights(updates)
        lora = {}
        for name, current in self.global_state.lora.items():
            factors = [u.state.lora.get(name) for u in updates]
            for update, f in zip(updates, factors):
                if f is None or f.A.shape != current.A.shape or f.B.shape != current.B.shape:
                    raise UpdateError(f"client {update.client_id} sent no LoRA factors of '{name}' in the global's shape")
            lora[name] = qr_aggregate(factors, weights, current.rank, current.scale)
        extra = {name: weighted_average([u.state.extra[name] for u in updates], weights) for name in self.global_state.extra}
        self.global_state = AdapterState(lora, extra, dict(self.global_state.base))
