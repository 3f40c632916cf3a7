"""What the event loop drives: the real federation, or the cost model alone (a dry run).

Both answer the same calls: ``sample``, ``configure`` (payload and its bytes), ``train`` (result
and its bytes), the three aggregation entry points, ``evaluate``, ``tokens`` and
``flops_per_token`` for the cost model, and ``snapshot``/``restore`` of a client's private state
for jobs the server cancels mid-training. :class:`ModelBackend` is a thin adapter from these calls
to the steps of :class:`~atoll.fl.federation.Federation` (the same steps the synchronous loop and
Flower drive); updates pass the federation's receive stages when they are aggregated.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from atoll.fl.base import local_steps
from atoll.fl.federation import Federation, InProcessClients
from atoll.fl.state import AdapterState, Update
from atoll.seeding import numpy_rng
from atoll.sim.realistic.cost import ModelCost, local_tokens
from atoll.sim.realistic.draws import Draws
from atoll.sim.realistic.system import Geometry, dtype_bytes


class ModelBackend:
    """The federation built by :func:`atoll.experiment.build`, its clients in this process."""

    dry = False

    def __init__(self, federation: Federation):
        self.federation = federation
        experiment = federation.experiment
        self.experiment = experiment
        self.config = experiment.config
        self.clients = experiment.clients
        self.access = InProcessClients(federation)
        self.sample_rate = self.config.federation.sample_rate
        workbench = experiment.workbench
        self.base_parameters = int(workbench.base_parameter_count())
        lengths = experiment.data.lengths()
        self.mean_tokens = {
            client_id: float(lengths[client.context.train_indices].mean()) if len(client.context.train_indices) else 0.0
            for client_id, client in self.clients.items()
        }
        self._flops: dict[int, float] = {}

    def cost(self, rank: int) -> ModelCost:
        state = self.experiment.workbench.initial_state(rank)
        lora = sum(f.A.numel() + f.B.numel() for f in state.lora.values())
        extra = sum(t.numel() for t in state.extra.values())
        return ModelCost(self.base_parameters, lora // max(1, rank), extra)

    def flops_per_token(self, rank: int) -> float:
        if rank not in self._flops:
            self._flops[rank] = self.cost(rank).flops_per_token(rank)
        return self._flops[rank]

    def tokens(self, client_id: int, round: int) -> float:
        client = self.clients[client_id]
        plan = client.plan(round)
        return local_tokens(
            plan.steps, plan.grad_accum, self.config.train.batch_size, client.context.num_examples, self.mean_tokens[client_id]
        )

    # -- the protocol: the federation's steps -----------------------------------------------------------
    def sample(self, round: int, available: np.ndarray) -> list[int]:
        return self.federation.sample(round, available)

    def configure(self, round: int, client_id: int) -> tuple[AdapterState, int]:
        state = self.federation.configure(round, client_id)
        return state, self.federation.message_bytes(client_id, state)

    def train(self, round: int, client_id: int, download: AdapterState) -> tuple[Update, int]:
        update = self.federation.train(round, client_id, download)
        return update, self.federation.upload_cost(update)[0]

    def upload_trips(self, update: Update) -> int:
        """Extra message round trips the protections add to this upload (0 by default)."""
        return self.federation.upload_cost(update)[1]

    def _received(self, round: int, updates: list[Update]) -> list[Update]:
        return [u for u in (self.federation.receive(round, update) for update in updates) if u is not None]

    def aggregate(self, round: int, updates: list[Update]) -> None:
        self.federation.aggregate(round, self._received(round, updates))

    def aggregate_async(self, version: int, update: Update, staleness: int, rule) -> None:
        if self._received(version, [update]):
            self.federation.aggregate_async(version, update, staleness, rule)

    def aggregate_buffered(self, version: int, updates: list[Update], staleness: list[int], starts: list[AdapterState], rule) -> None:
        kept = set(map(id, self._received(version, updates)))
        chosen = [i for i, update in enumerate(updates) if id(update) in kept]
        self.federation.aggregate_buffered(
            version, [updates[i] for i in chosen], [staleness[i] for i in chosen], [starts[i] for i in chosen], rule
        )

    def evaluate(self, round: int, final: bool) -> dict[str, Any]:
        return self.federation.evaluate(round, final, self.access)

    def train_summary(self, results: list[Update]) -> dict[str, float]:
        return self.federation.train_summary(results) if results else {}

    def round_extras(self, round: int) -> dict[str, Any]:
        return self.federation.round_extras(round)

    def stop_reason(self) -> str | None:
        return self.federation.stop_reason()

    def snapshot(self, client_id: int):
        return self.experiment.store.get(client_id)

    def restore(self, client_id: int, snapshot) -> None:
        store = self.experiment.store
        if snapshot is None:
            store.discard(client_id)
        else:
            store.put(client_id, snapshot)


class DryBackend:
    """No data, no model: clients' example counts come from the sys.yaml workload, transfer sizes
    from the model's geometry, sampling is BaseServer's uniform rule, aggregation does nothing."""

    dry = True

    def __init__(self, config, spec, geometry: Geometry, ranks: list[int]):
        self.config = config
        self.sample_rate = config.federation.sample_rate
        self.num_clients = config.federation.clients
        self.geometry = geometry
        self.ranks = ranks
        draws = Draws(config.seed)
        ids = np.arange(self.num_clients)
        quantity = spec.workload.examples
        if isinstance(quantity, (int, float)):
            examples = np.full(self.num_clients, float(quantity))
        else:
            z = np.clip(draws.normals("dry-examples", ids), -3.0, 3.0)
            examples = quantity.median * np.exp(quantity.sigma * z)
        self.examples = np.maximum(1, np.rint(examples)).astype(np.int64)
        per_token = spec.workload.tokens_per_example
        train = config.train
        self._tokens = [
            local_tokens(local_steps(train, int(n)), train.grad_accum, train.batch_size, int(n), per_token) for n in self.examples
        ]
        self._cost = ModelCost(geometry.base_parameters, geometry.lora_parameters_per_rank, geometry.extra_parameters)
        self._bytes: dict[int, int] = {}
        self._width = dtype_bytes(config)

    def adapter_bytes(self, rank: int) -> int:
        """Payload bytes of a rank-``rank`` adapter: LoRA factors in float32 (PEFT keeps adapters in
        float32 on a bfloat16 base), other trained tensors (heads) in the model's dtype."""
        if rank not in self._bytes:
            self._bytes[rank] = 4 * self.geometry.lora_parameters_per_rank * rank + self._width * self.geometry.extra_parameters
        return self._bytes[rank]

    def flops_per_token(self, rank: int) -> float:
        return self._cost.flops_per_token(rank)

    def tokens(self, client_id: int, round: int) -> float:
        return self._tokens[client_id]

    def sample(self, round: int, available: np.ndarray) -> list[int]:
        """BaseServer.sample: ceil(sample_rate * N) (at least 1) uniformly from the available."""
        count = min(len(available), max(1, int(math.ceil(self.sample_rate * self.num_clients - 1e-9))))
        if count >= len(available):
            return [int(c) for c in available]
        chosen = numpy_rng(self.config.seed, "sample", round).choice(available, size=count, replace=False)
        return sorted(int(c) for c in chosen)

    def configure(self, round: int, client_id: int) -> tuple[None, int]:
        return None, self.adapter_bytes(self.ranks[client_id])

    def train(self, round: int, client_id: int, download) -> tuple[None, int]:
        return None, self.adapter_bytes(self.ranks[client_id])

    def aggregate(self, round: int, updates) -> None:
        return None

    def aggregate_async(self, version: int, update, staleness: int, rule) -> None:
        return None

    def aggregate_buffered(self, version: int, updates, staleness, starts, rule) -> None:
        return None

    def evaluate(self, round: int, final: bool) -> dict[str, Any]:
        return {}

    def train_summary(self, results) -> dict[str, float]:
        return {}

    def upload_trips(self, result) -> int:
        return 0

    def round_extras(self, round: int) -> dict[str, Any]:
        return {}

    def stop_reason(self) -> str | None:
        return None

    def snapshot(self, client_id: int):
        return None

    def restore(self, client_id: int, snapshot) -> None:
        return None


__all__ = ["ModelBackend", "DryBackend"]
