"""RAVAN: multi-head low-rank adaptation with frozen random bases (Raje, Askin, Jhunjhunwala,
Joshi, "Ravan: Multi-Head Low-Rank Adaptation for Federated Fine-Tuning", NeurIPS 2025).

Every adapted layer gets delta W = scale * sum_h s_h B_h H_h A_h with B_h, A_h frozen, random and
shared (regenerated from the seed in every process, never transmitted); clients train only the
cores H_h and the head scales s_h (plus the task head, as every LoRA algorithm here) and upload
s_h H_h directly, as in the paper. Server:

    H_h <- sum_k p_k s_{k,h} H_{k,h},   s_h <- 1,   p_k = n_k / sum_j n_j

which is exact: sum_k p_k sum_h s_{k,h} B_h H_{k,h} A_h = sum_h B_h H_h A_h (the bases are shared,
so the average of the updates is the update of the averaged cores). The global adapter is
evaluated and exported as the equivalent rank heads*r_h PEFT LoRA.

Flags: not ``personal`` (one global adapter); ``asynchronous`` (the aggregate is a weighted
mean of the folded cores s_h H_h, so the generic one-at-a-time and buffered rules apply to them);
mixed ranks are refused (all clients share the same bases; RAVAN's own answer to compute
heterogeneity, training a subset of heads, is not implemented).
"""

from __future__ import annotations

import dataclasses

import torch

from atoll.algorithms.catalog import RavanParams, SPECS
from atoll.fl.base import BaseClient, BaseServer, weighted_average
from atoll.fl.state import AdapterState, Update, example_weights
from atoll.errors import UpdateError
from atoll.models.branches import PRIMARY, BranchHost, FixedGates, lora_scale, train_parameters
from atoll.models.ravan import RAVAN, default_head_rank, equivalent_lora, install_ravan, ravan_bases

PREFIX = f"{RAVAN}."


def head_rank_for(params: RavanParams, rank: int, shapes) -> int:
    return params.head_rank or default_head_rank(rank, params.heads, shapes)


def split(state: AdapterState) -> tuple[dict, dict]:
    """(RAVAN tensors keyed '<layer>.H' / '<layer>.s', other extras such as the task head)."""
    own = {k[len(PREFIX) :]: v for k, v in state.extra.items() if k.startswith(PREFIX)}
    rest = {k: v for k, v in state.extra.items() if not k.startswith(PREFIX)}
    return own, rest


class RavanClient(BaseClient):
    @property
    def host(self) -> BranchHost:
        return BranchHost.of(self.workbench)

    def load(self, download: AdapterState) -> None:
        """Cores into the RAVAN branches; the task head into PEFT's adapter, whose own LoRA is
        reset to its initial state (B = 0) and gated off."""
        cores, rest = split(download)
        workbench = self.workbench
        workbench.load(AdapterState(lora=workbench.initial_state(self.context.rank).lora, extra=rest, base=download.base))
        self.host.write(RAVAN, cores)

    def run(self, round: int, download: AdapterState) -> Update:
        self.load(download)
        workbench = self.workbench
        params = self.host.parameters(RAVAN) + workbench.active.parameters(lora_A=False, lora_B=False, extra=True)
        with self.host.engaged(FixedGates({PRIMARY: 0.0, RAVAN: 1.0})):
            metrics = train_parameters(
                workbench, params, self.context.train_indices, self.plan(round), self.context.config, (self.client_id, round)
            )
        trained = self.host.read(RAVAN)
        extra = {}
        for layer in self.host.layers:  # upload s_h H_h directly (the scales are folded in)
            extra[f"{PREFIX}{layer}.H"] = trained[f"{layer}.s"][:, None, None] * trained[f"{layer}.H"]
        extra.update(workbench.read().extra)
        return Update(self.client_id, self.context.num_examples, AdapterState(extra=extra), metrics)

    def evaluate(self, download, indices=None) -> dict[str, float]:
        self.load(download)
        chosen = self.context.test_indices if indices is None else indices
        with self.host.engaged(FixedGates({PRIMARY: 0.0, RAVAN: 1.0})):
            return self.workbench.evaluate(chosen, max_generate=self.context.config.eval.max_generate)


class Ravan(BaseServer):
    """Keeps the RAVAN state (cores, unit scales, head) that clients download, and its exact
    PEFT-LoRA equivalent as ``global_state`` for evaluation, checkpoints and export."""

    spec = SPECS["ravan"]
    client_class = RavanClient

    def __init__(self, context, params):
        super().__init__(context, params)
        initial = self.global_state
        lora = context.config.model.lora
        self.shapes = {name: (int(f.B.shape[0]), int(f.A.shape[1])) for name, f in initial.lora.items()}
        self.head_rank = head_rank_for(params, lora.rank, self.shapes.values())
        self.scale = lora_scale(lora, self.head_rank)
        self.export_scale = lora_scale(lora, params.heads * self.head_rank)
        extra = {}
        for name in self.shapes:
            extra[f"{PREFIX}{name}.H"] = torch.zeros(params.heads, self.head_rank, self.head_rank)
            extra[f"{PREFIX}{name}.s"] = torch.ones(params.heads)
        extra.update(initial.extra)
        self.ravan = AdapterState(extra=extra, base=dict(initial.base))
        self.global_state = self.export(self.ravan)

    @classmethod
    def prepare_workbench(cls, workbench, config, params) -> None:
        host = BranchHost.of(workbench)
        shapes = [host.shape(layer) for layer in host.layers]
        install_ravan(host, config.seed, params.heads, head_rank_for(params, config.model.lora.rank, shapes), config.model.lora)

    def bases(self, name: str):
        out_features, in_features = self.shapes[name]
        return ravan_bases(self.context.seed, name, out_features, in_features, self.params.heads, self.head_rank)

    def export(self, ravan: AdapterState) -> AdapterState:
        """The exact equivalent PEFT LoRA (rank heads*r_h), with the RAVAN tensors and head as extras."""
        lora = {}
        for name in self.shapes:
            B, A = self.bases(name)
            lora[name] = equivalent_lora(
                B, A, ravan.extra[f"{PREFIX}{name}.H"], ravan.extra[f"{PREFIX}{name}.s"], self.scale, self.export_scale
            )
        return AdapterState(lora=lora, extra=dict(ravan.extra), base=dict(ravan.base))

    def configure(self, round: int, client_id: int) -> AdapterState:
        return self.ravan

    def fold(self, state: AdapterState) -> AdapterState:
        """``state`` with each core replaced by s_h H_h and the scales by 1 (uploads from clients
        here carry folded cores and no scales; a scale-less core counts as s = 1)."""
        extra = dict(state.extra)
        for name in self.shapes:
            H_key, s_key = f"{PREFIX}{name}.H", f"{PREFIX}{name}.s"
            if H_key not in extra:
                raise UpdateError(f"a RAVAN update has no '{H_key}'")
            scales = extra.get(s_key)
            if scales is not None:
                extra[H_key] = scales.float()[:, None, None] * extra[H_key].float()
            extra[s_key] = torch.ones(self.params.heads)
        return AdapterState(dict(state.lora), extra, dict(state.base))

    def aggregate(self, round: int, updates: list[Update]) -> None:
        """H_h <- sum_k p_k s_{k,h} H_{k,h}, s_h <- 1, head <- sum_k p_k head_k."""
        if not updates:
            return
        folded = [self.fold(u.state) for u in updates]
        for update, state in zip(updates, folded):
            missing = set(self.ravan.extra) - set(state.extra)
            if missing:
                raise UpdateError(f"client {update.client_id} sent no '{sorted(missing)[0]}'")
        weights = example_weights(updates)
        extra = {key: weighted_average([state.extra[key] for state in folded], weights) for key in self.ravan.extra}
        for name in self.shapes:
            extra[f"{PREFIX}{name}.s"] = torch.ones(self.params.heads)  # exactly 1, not a float sum of ones
        self.ravan = AdapterState(extra=extra, base=self.ravan.base)
        self.global_state = self.export(self.ravan)

    def _on_ravan_state(self, rule) -> None:
        """Apply a generic rule of BaseServer (which works on ``global_state``) to the RAVAN state of
        folded cores, then re-export the PEFT equivalent."""
        self.global_state = self.ravan
        try:
            rule()
            self.ravan = AdapterState(extra=dict(self.global_state.extra), base=dict(self.global_state.base))
        finally:
            self.global_state = self.export(self.ravan)

    def aggregate_async(self, version, update, staleness, rule) -> None:
        """FedAsync on the folded cores: H <- (1 - a) H + a s_k H_k (s stays 1)."""
        folded = dataclasses.replace(update, state=self.fold(update.state))
        self._on_ravan_state(lambda: super(Ravan, self).aggregate_async(version, folded, staleness, rule))

    def aggregate_buffered(self, version, updates, staleness, starts, rule) -> None:
        """FedBuff on the folded cores (downloads already have s = 1)."""
        folded = [dataclasses.replace(u, state=self.fold(u.state)) for u in updates]
        starts = [self.fold(start) for start in starts]
        self._on_ravan_state(lambda: super(Ravan, self).aggregate_buffered(version, folded, staleness, starts, rule))

    def load_state_dict(self, tensors) -> None:
        super().load_state_dict(tensors)
        self.ravan = AdapterState(extra=dict(self.global_state.extra), base=dict(self.global_state.base))
