"""The algorithm's BaseServer behind Flower's strategy interfaces.

:class:`AlgorithmStrategy` is a Message-API ``Strategy`` whose ``configure_train`` sends each
sampled client the download ``server.configure(round, client_id)`` and whose ``aggregate_train``
hands the decoded updates to the federation's receive stages and aggregation (no aggregation
math here). It exists so Flower's
DP wrappers (``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``) can wrap it: they
clip replies before ``aggregate_train`` and add noise to what it returns.

:class:`SecAggStrategy` is the legacy-API ``Strategy`` that Flower's ``SecAggPlusWorkflow`` drives:
``configure_fit`` hands out the same downloads, and ``aggregate_fit`` receives only the securely
summed weighted mean, which it passes to ``server.aggregate`` as one update (exact for algorithms
that aggregate by a weighted mean; others are refused in :mod:`.checks`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from atoll.engines.flower.codec import (
    arrays_to_tensors,
    join_state,
    scales_to_config,
    split_state,
    state_from_legacy,
    state_from_records,
    state_to_legacy,
    tensors_to_arrays,
)
from atoll.errors import AlgorithmError, UpdateError
from atoll.fl.base import BaseServer
from atoll.fl.state import AdapterState, Update

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SECURE_AGGREGATE = -2  # client id of the one update SecAgg+ reveals: the weighted mean of all


@dataclass
class RoundPlan:
    """Who trains in a round, on which node, starting from what."""

    round: int
    nodes: dict[int, int]  # client id -> node id
    downloads: dict[int, AdapterState]
    updates: list[Update] = field(default_factory=list)  # received and kept
    refused: list[int] = field(default_factory=list)  # clients whose update a receive stage dropped
    bytes_up: int = 0
    aggregate_seconds: float = 0.0

    def client_of(self) -> dict[int, int]:
        return {node: client for client, node in self.nodes.items()}


def update_from_reply(content, client_id: int | None = None) -> Update:
    """A train reply (``arrays`` + ``metrics`` + ``config`` with scales) as an Update."""
    metrics = dict(content.metric_records[METRICS])
    sender = int(metrics.pop("client-id"))
    if client_id is not None and sender != client_id:
        raise UpdateError(f"a reply meant for client {client_id} says it comes from client {sender}")
    examples = int(metrics.pop("num-examples"))
    config = content.config_records.get(CONFIG, {})
    state = state_from_records(content.array_records[ARRAYS], config)
    floats = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("atoll.")}
    return Update(sender, examples, state, floats)


def check_uniform_download(server: BaseServer, plan: RoundPlan) -> None:
    """Flower's DP wrappers clip ``upload - global``: every client must download the global adapter."""
    reference, _ = split_state(server.global_state)
    for client_id, download in plan.downloads.items():
        tensors, _ = split_state(download)
        same = list(tensors) == list(reference) and all(
            tensors[key].shape == reference[key].shape and bool((tensors[key] == reference[key]).all()) for key in reference
        )
        if not same:
            raise AlgorithmError(
                f"algorithm '{server.name}' sends client {client_id} a download that differs from the global adapter; "
                "Flower's DP wrappers clip each update against one global model",
                "set flower.dp.mode: none for this algorithm",
            )


def _message_strategy_base():
    from flwr.serverapp.strategy import Strategy

    return Strategy


class AlgorithmStrategy(_message_strategy_base()):  # type: ignore[misc]
    """The federation's aggregation as a Message-API Strategy (train only; evaluation is driven by
    the FlowerDriver): replies pass the federation's receive stages, then its aggregation."""

    def __init__(self, federation, train_action: str = "", uniform_download: bool = False, equal_weights: bool = False):
        super().__init__()
        self.federation = federation
        self.server: BaseServer = federation.server
        self.train_action = train_action  # "" -> message type "train"; "x" -> "train.x"
        self.uniform_download = uniform_download
        # DP: the algorithm averages the clipped updates 1/m each (every update counts one example)
        self.equal_weights = equal_weights
        self.plan: RoundPlan | None = None
        self.ttl: float | None = None  # seconds a message stays deliverable (None: Flower's 12 h)

    def configure_train(self, server_round, arrays, config, grid):
        from flwr.app import ConfigRecord, Message, RecordDict

        plan = self.plan
        if plan is None or plan.round != server_round:
            raise RuntimeError(f"no plan for round {server_round}")
        if self.uniform_download:
            check_uniform_download(self.server, plan)
        message_type = "train" + (f".{self.train_action}" if self.train_action else "")
        messages = []
        for client_id, node_id in plan.nodes.items():
            tensors, scales = split_state(plan.downloads[client_id])
            entries = dict(config)
            entries.update(scales_to_config(scales))
            entries.update({"round": server_round, "client-id": client_id})
            content = RecordDict({ARRAYS: tensors_to_arrays(tensors), CONFIG: ConfigRecord(entries)})
            messages.append(Message(content, dst_node_id=node_id, message_type=message_type, group_id=str(server_round), ttl=self.ttl))
        return messages

    def aggregate_train(self, server_round, replies):
        from flwr.app import MetricRecord

        plan = self.plan
        client_of = plan.client_of()
        updates = [update_from_reply(reply.content, client_of.get(reply.metadata.src_node_id)) for reply in replies]
        updates.sort(key=lambda u: u.client_id)  # the local engine's order: float sums match
        plan.bytes_up = sum(self.federation.upload_cost(u)[0] for u in updates)
        kept = [u for u in updates if self.federation.receive(server_round, u) is not None]
        plan.refused = sorted({u.client_id for u in updates} - {u.client_id for u in kept})
        started = time.perf_counter()
        if self.equal_weights:
            self.federation.aggregate(server_round, [dataclasses.replace(u, num_examples=1) for u in kept])
        else:
            self.federation.aggregate(server_round, kept)
        plan.aggregate_seconds = time.perf_counter() - started
        plan.updates = kept
        tensors, _ = split_state(self.server.global_state)
        return tensors_to_arrays(tensors), MetricRecord({"updates": len(updates)})

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self) -> None:
        return None


def adopt_aggregate(server: BaseServer, arrays) -> None:
    """Take the (noised) aggregate a DP wrapper returned as the server's global adapter."""
    _, scales = split_state(server.global_state)
    server.global_state = join_state(arrays_to_tensors(arrays), scales)


# -- SecAgg+ (legacy API) -----------------------------------------------------------------------------

META = "atoll.meta"


def _legacy_strategy_base():
    from flwr.server.strategy import Strategy

    return Strategy


class SecAggStrategy(_legacy_strategy_base()):  # type: ignore[misc]
    """The legacy Strategy that Flower's SecAggPlusWorkflow calls for one round."""

    def __init__(self, federation):
        super().__init__()
        self.federation = federation
        self.server: BaseServer = federation.server
        self.plan: RoundPlan | None = None
        self.grid = None
        self.run_id = 0
        self.aggregated = False
        self.client_metrics: dict[int, dict[str, float]] = {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        from flwr.common import FitIns, ndarrays_to_parameters
        from flwr.server.compat.grid_client_proxy import GridClientProxy

        plan = self.plan
        instructions = []
        for client_id, node_id in plan.nodes.items():
            arrays, description = state_to_legacy(plan.downloads[client_id])
            fit_config = {META: description, "atoll.round": server_round, "atoll.client-id": client_id}
            proxy = GridClientProxy(node_id, self.grid, self.run_id)
            instructions.append((proxy, FitIns(ndarrays_to_parameters(arrays), fit_config)))
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        """``results`` all carry the same parameters: the unmasked weighted mean."""
        from flwr.common import parameters_to_ndarrays

        plan = self.plan
        if not results:
            return None, {}
        descriptions = {res.metrics[META] for _, res in results}
        if len(descriptions) != 1:
            raise UpdateError("clients uploaded different tensors; SecAgg+ can only sum uploads of one shape")
        mean = state_from_legacy(parameters_to_ndarrays(results[0][1].parameters), descriptions.pop())
        self.client_metrics = {}
        examples = 0
        for _, res in results:
            metrics = {k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float)) and not k.startswith("atoll.")}
            client_id = int(metrics.pop("client-id"))
            self.client_metrics[client_id] = metrics
            examples += int(res.num_examples)
        update = Update(SECURE_AGGREGATE, examples, mean, {})
        if self.federation.receive(server_round, update) is None:
            raise UpdateError(f"round {server_round}: the securely summed update was refused ({self.federation.dropped[-1]['reason']})")
        started = time.perf_counter()
        self.federation.aggregate(server_round, [update])
        plan.aggregate_seconds = time.perf_counter() - started
        plan.updates = [
            Update(client_id, int(metrics.get("num-examples", 0)), mean, {k: v for k, v in metrics.items() if k != "num-examples"})
            for client_id, metrics in sorted(self.client_metrics.items())
        ]
        self.aggregated = True
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def secagg_workflow(settings, max_weight: float, timeout: float):
    from flwr.server.workflow import SecAggPlusWorkflow

    return SecAggPlusWorkflow(
        num_shares=settings.num_shares,
        reconstruction_threshold=settings.reconstruction_threshold,
        max_weight=float(max_weight),
        clipping_range=settings.clipping_range,
        quantization_range=settings.quantization_range,
        timeout=timeout,
    )
