"""FedDPA: a federated global adapter and a private local adapter, mixed per test instance
(Yang, Long, Shen, Jiang, Blumenstein, "Dual-Personalizing Adapter for Federated Foundation
Models", NeurIPS 2024).

Each client holds two LoRA adapters that are live in the model at the same time:
global (A_g, B_g), FedAvg'd like FedIT, and local (A_l, B_l), never uploaded. At inference,

    h = W0 x + (1 - a(x)) s B_g A_g x + a(x) s B_l A_l x,
    a(x) = clip(lambda * mean_j cos(e(x), e(x_j)), 0, 1)

with e(.) the mean-pooled last hidden state under the local adapter and x_1..x_S local training
examples. Outputs are mixed per instance; the factors are never interpolated.
Training, per sampled client and round:
  1. the global adapter takes a FedIT local update (local adapter off) and is uploaded;
  2. FedDPA-T (variant "iterative"): the local adapter (first initialised from the client's
     trained global) trains with the global frozen, mixed at fixed weights (1 - w, w).
FedDPA-F (variant "finetune") skips step 2 during the rounds: a client fine-tunes its local
adapter from the global it is evaluated with (once per global, cached in its store).

Flags: ``personal`` (the local adapter is private and used at inference); ``asynchronous``
(the server side is FedAvg of global adapters, which can take one update at a time); ranks are
refused when mixed (the two adapters and FedAvg share one rank).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from atoll.algorithms.catalog import SPECS
from atoll.algorithms._personal import pack, state_digest, unpack
from atoll.fl.base import BaseClient, BaseServer, local_steps
from atoll.fl.state import AdapterState, LoRAFactors, Update
from atoll.models.branches import PRIMARY, BranchHost, FixedGates, train_parameters
from atoll.models.dual import InstanceGate, reference_representations
from atoll.seeding import numpy_rng

LOCAL = "local"


class FedDPAClient(BaseClient):
    @property
    def host(self) -> BranchHost:
        return BranchHost.of(self.workbench)

    # -- the private local adapter -------------------------------------------------------------
    def stored_local(self) -> tuple[dict[str, LoRAFactors] | None, str | None]:
        stored = self.context.store.get(self.client_id)
        if stored is None:
            return None, None
        state, digest = unpack(stored)
        return state.lora, digest

    def train_local(
        self, global_state: AdapterState, local: dict[str, LoRAFactors], rng_keys: tuple, round: int
    ) -> tuple[dict[str, LoRAFactors], dict[str, float]]:
        """Train the local adapter with the global one live and frozen, mixed at (1 - w, w)."""
        workbench = self.workbench
        workbench.load(global_state)
        self.host.write_lora(LOCAL, local)
        plan = self.plan(round)
        steps = self.params.local_steps or local_steps(self.context.config.train, self.context.num_examples)
        plan = dataclasses.replace(plan, steps=steps)
        weight = self.params.train_weight
        with self.host.engaged(FixedGates({PRIMARY: 1.0 - weight, LOCAL: weight})):
            metrics = train_parameters(
                workbench, self.host.parameters(LOCAL), self.context.train_indices, plan, self.context.config, rng_keys
            )
        return self.host.read_lora(LOCAL), metrics

    # -- protocol ---------------------------------------------------------------------------------
    def run(self, round: int, download: AdapterState) -> Update:
        update = super().run(round, download)  # step 1: FedIT update of the global adapter
        if self.params.variant == "iterative":
            local, _ = self.stored_local()
            if local is None:
                local = {name: factors.clone() for name, factors in update.state.lora.items()}
            local, metrics = self.train_local(update.state, local, (self.client_id, round, "feddpa-local"), round)
            self.context.store.put(self.client_id, pack(AdapterState(lora=local)))
            update.metrics["local_loss"] = metrics["loss"]
        return update

    def local_for(self, download: AdapterState) -> dict[str, LoRAFactors] | None:
        """The local adapter used with ``download`` (FedDPA-F fine-tunes it on first use)."""
        local, digest = self.stored_local()
        if self.params.variant == "iterative":
            return local
        wanted = state_digest(download)
        if local is None or digest != wanted:
            start = {name: factors.clone() for name, factors in download.lora.items()}
            local, _ = self.train_local(download, start, (self.client_id, "feddpa-finetune", wanted), 1)
            self.context.store.put(self.client_id, pack(AdapterState(lora=local), wanted))
        return local

    def references(self) -> np.ndarray:
        train = self.context.train_indices
        count = min(self.params.reference_examples, len(train))
        chosen = numpy_rng(self.context.config.seed, "feddpa-references", self.client_id).choice(len(train), size=count, replace=False)
        return train[np.sort(chosen)]

    def evaluate(self, download: AdapterState, indices: np.ndarray | None = None) -> dict[str, float]:
        local = self.local_for(download)
        workbench = self.workbench
        workbench.load(download)
        chosen = self.context.test_indices if indices is None else indices
        max_generate = self.context.config.eval.max_generate
        if local is None:  # never trained (not sampled yet): the global adapter alone, a(x) = 0
            metrics = workbench.evaluate(chosen, max_generate=max_generate)
            if metrics:
                metrics["alpha"] = 0.0
            return metrics
        self.host.write_lora(LOCAL, local)
        references = reference_representations(self.host, workbench, self.references(), LOCAL)
        gate = InstanceGate(LOCAL, references, self.params.lambda_scale)
        with self.host.engaged(gate):
            metrics = workbench.evaluate(chosen, max_generate=max_generate)
        if metrics:
            metrics["alpha"] = gate.mean_alpha()
        return metrics


class FedDPA(BaseServer):
    """Server: FedAvg of the clients' global adapters (the local adapters never arrive)."""

    spec = SPECS["feddpa"]
    client_class = FedDPAClient

    @classmethod
    def prepare_workbench(cls, workbench, config, params) -> None:
        BranchHost.of(workbench).add_lora(LOCAL, config.model.lora.rank, config.model.lora, config.seed)
