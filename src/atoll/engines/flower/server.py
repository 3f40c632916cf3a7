"""The ServerApp: the federation's rounds, with clients reached through Flower's Grid.

:class:`FlowerDriver` is a thin driver over :class:`~atoll.fl.federation.Federation` (the same
steps, recorder, checkpoints and outputs as the synchronous loop); what it adds is transport:
training messages (plain, under Flower's DP wrappers, or in a SecAgg+ workflow) and evaluation
messages (:class:`FlowerClients`).

A round: wait until ``flower.min_available_clients`` partitions are online, let the algorithm
sample among them, send each sampled client its download, collect replies until all arrived,
``flower.round_timeout`` passed, or a node went offline; clients that did not answer are recorded
under ``flower.dropped`` with the reason, and the algorithm aggregates the rest (a round with fewer
replies than ``min_available_clients`` fails the run).
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any

from atoll.engines.flower import protocol
from atoll.engines.flower.codec import split_state, tensors_to_arrays
from atoll.engines.flower.strategy import (
    AlgorithmStrategy,
    RoundPlan,
    SecAggStrategy,
    adopt_aggregate,
    secagg_workflow,
)
from atoll.errors import AlgorithmError, AtollError

log = logging.getLogger("atoll.flower")

POLL_SECONDS = 0.5
LIVENESS_SECONDS = 3.0
TTL_MARGIN = 60.0  # a message outlives its round by this much, then expires: a node that comes back
# late does not train on a round whose result was already aggregated without it


class RoundFailed(AtollError):
    kind = "flower round failed"


# -- talking to nodes ---------------------------------------------------------------------------------


def exchange(grid, messages: dict[int, Any], timeout: float, poll: float = POLL_SECONDS) -> tuple[dict[int, Any], dict[int, str]]:
    """Send ``{client_id: message}`` and wait for the replies.

    Returns (replies by client, failure reasons by client). Stops at ``timeout`` or as soon as
    every message is answered; a destination node that leaves the online set counts as failed at
    once instead of waiting for the timeout (Flower marks a node offline when it shuts down, or
    after two missed heartbeats when it crashes)."""
    replies: dict[int, Any] = {}
    failures: dict[int, str] = {}
    if not messages:
        return replies, failures
    order = list(messages)
    node_of = {client_id: messages[client_id].metadata.dst_node_id for client_id in order}
    message_ids = list(grid.push_messages([messages[c] for c in order]))
    pending: dict[str, int] = {}
    for client_id, message_id in zip(order, message_ids):
        if message_id:
            pending[message_id] = client_id
        else:
            failures[client_id] = "the SuperLink refused the message"
    deadline = time.monotonic() + timeout
    last_liveness = time.monotonic()
    while pending:
        for reply in grid.pull_messages(list(pending)):
            client_id = pending.pop(reply.metadata.reply_to_message_id, None)
            if client_id is None:
                continue
            if reply.has_error():
                failures[client_id] = f"{reply.error.reason} (code {reply.error.code})"
            else:
                replies[client_id] = reply
        if not pending:
            break
        now = time.monotonic()
        if now >= deadline:
            for client_id in pending.values():
                failures[client_id] = f"no reply within flower.round_timeout={timeout:g}s"
            break
        if now - last_liveness >= LIVENESS_SECONDS:
            last_liveness = now
            online = set(grid.get_node_ids())
            for message_id, client_id in list(pending.items()):
                if node_of[client_id] not in online:
                    failures[client_id] = "its SuperNode went offline"
                    del pending[message_id]
        time.sleep(poll)
    return replies, failures


class NodeDirectory:
    """Which online node serves which client (its ``partition-id``), learned by a ``query``
    message to every node seen for the first time; in a node-data run the reply also gives the
    client's example counts, handed to ``on_counts(client_id, train, test)``."""

    def __init__(self, grid, num_clients: int, timeout: float, node_data: bool = False, on_counts=None):
        self.grid = grid
        self.num_clients = num_clients
        self.timeout = timeout
        self.node_data = node_data
        self.on_counts = on_counts
        self.client_of_node: dict[int, int] = {}
        self.rejected: dict[int, str] = {}

    def refresh(self) -> dict[int, int]:
        """{client_id: node_id} of the clients online now."""
        online = set(self.grid.get_node_ids())
        new = sorted(online - set(self.client_of_node) - set(self.rejected))
        if new:
            messages = {index: protocol.query_message(node_id, ttl=self.timeout + TTL_MARGIN) for index, node_id in enumerate(new)}
            replies, failures = exchange(self.grid, messages, self.timeout)
            for index, reason in failures.items():
                log.warning("node %s did not answer the partition query: %s", new[index], reason)
            for index, reply in replies.items():
                node_id = new[index]
                client_id, problem, counts = protocol.read_query_reply(reply.content, self.num_clients, self.node_data)
                if problem:
                    self.rejected[node_id] = problem
                    log.warning("ignoring node %s: %s", node_id, problem)
                    continue
                self.client_of_node[node_id] = client_id
                if counts is not None and self.on_counts is not None:
                    self.on_counts(client_id, *counts)
        mapping: dict[int, int] = {}
        for node_id in sorted(online):
            client_id = self.client_of_node.get(node_id)
            if client_id is None:
                continue
            if client_id in mapping:
                log.warning("clients' partition %s is served by nodes %s and %s; using the first", client_id, mapping[client_id], node_id)
                continue
            mapping[client_id] = node_id
        return mapping

    def wait_for(self, count: int, timeout: float) -> dict[int, int]:
        """Wait until ``count`` clients are online (ConfigError-like failure after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            mapping = self.refresh()
            if len(mapping) >= count:
                return mapping
            if time.monotonic() >= deadline:
                rejected = "; ".join(f"node {n}: {why}" for n, why in self.rejected.items())
                raise RoundFailed(
                    f"only {len(mapping)} of the {count} clients needed are online after flower.wait_timeout={timeout:g}s"
                    + (f" ({rejected})" if rejected else ""),
                    "start more SuperNodes (one per partition-id) or lower flower.min_available_clients",
                )
            time.sleep(1.0)


# -- the driver -----------------------------------------------------------------------------------------


class FlowerClients:
    """The federation's clients on Flower nodes, reached by ``evaluate`` messages."""

    def __init__(self, driver: "FlowerDriver"):
        self.driver = driver

    def evaluate(self, round: int, client_ids: list[int], scope: str) -> dict[int, dict[str, float]]:
        driver = self.driver
        online = driver.nodes.refresh()
        reachable = [c for c in client_ids if c in online]
        ttl = driver.flower.round_timeout + TTL_MARGIN
        federation = driver.federation
        messages = {c: protocol.evaluate_message(online[c], round, c, federation.configure(round, c), scope, ttl=ttl) for c in reachable}
        replies, failures = exchange(driver.grid, messages, driver.flower.round_timeout)
        for client_id, reason in sorted(failures.items()):
            log.warning("evaluation on client %s failed: %s", client_id, reason)
        return {c: protocol.read_metrics(replies[c].content, c) for c in sorted(replies)}


class FlowerDriver:
    """The federation's rounds with its clients on Flower nodes: the server-side steps run here,
    the client-side steps in each node's ClientApp."""

    def __init__(self, federation, recorder, grid, context):
        self.federation = federation
        self.recorder = recorder
        self.config = federation.config
        self.grid = grid
        self.context = context
        self.flower = self.config.flower
        self.nodes = NodeDirectory(
            grid,
            self.config.federation.clients,
            self.flower.round_timeout,
            node_data=self.flower.node_data,
            on_counts=getattr(federation, "report_counts", None),
        )
        self.clientapp_seconds: dict[str, dict[str, float]] = {}  # this round's train replies' timing
        self.clients = FlowerClients(self)
        dp = self.flower.dp
        action = {"client-fixed": protocol.ACTION_CLIP_FIXED, "client-adaptive": protocol.ACTION_CLIP_ADAPTIVE}.get(dp.mode, "")
        self.algorithm_strategy = AlgorithmStrategy(
            federation,
            train_action=action,
            uniform_download=dp.mode != "none",
            equal_weights=dp.mode != "none" and dp.weighting == "equal",
        )
        self.algorithm_strategy.ttl = self.flower.round_timeout + TTL_MARGIN
        self.strategy = self._with_dp(self.algorithm_strategy)
        self.secagg = SecAggStrategy(federation) if self.flower.secagg.enabled else None
        self.dp_accountant = self._dp_accountant()

    # -- settings ---------------------------------------------------------------------------------
    def min_clients(self) -> int:
        return self.flower.min_available_clients or self.config.federation.clients

    def expected_sampled(self) -> int:
        federation = self.config.federation
        return max(1, int(math.ceil(federation.sample_rate * federation.clients - 1e-9)))

    def _with_dp(self, inner):
        dp = self.flower.dp
        if dp.mode == "none":
            return inner
        from flwr.serverapp.strategy import (
            DifferentialPrivacyClientSideAdaptiveClipping,
            DifferentialPrivacyClientSideFixedClipping,
            DifferentialPrivacyServerSideAdaptiveClipping,
            DifferentialPrivacyServerSideFixedClipping,
        )

        sampled = self.expected_sampled()
        if dp.mode == "server-fixed":
            return DifferentialPrivacyServerSideFixedClipping(inner, dp.noise_multiplier, dp.clipping_norm, sampled)
        if dp.mode == "client-fixed":
            return DifferentialPrivacyClientSideFixedClipping(inner, dp.noise_multiplier, dp.clipping_norm, sampled)
        wrapper = (
            DifferentialPrivacyServerSideAdaptiveClipping if dp.mode == "server-adaptive" else DifferentialPrivacyClientSideAdaptiveClipping
        )
        return wrapper(
            inner,
            dp.noise_multiplier,
            sampled,
            initial_clipping_norm=dp.clipping_norm,
            target_clipped_quantile=dp.target_clipped_quantile,
            clip_norm_lr=dp.clip_norm_lr,
        )

    def _dp_accountant(self):
        """The accountant of Flower's DP wrappers: each round is one sampled Gaussian mechanism with
        the configured noise multiplier z and q = sampled / clients (Flower samples a fixed number;
        the RDP bound for Poisson sampling at that rate is the usual stand-in). The adaptive wrappers
        split z between the update and the clipped count as Andrew et al. (NeurIPS 2021) do, so the
        pair keeps z. None without noise (ε would be infinite)."""
        dp = self.flower.dp
        if dp.mode == "none" or dp.noise_multiplier <= 0:
            return None
        from atoll.privacy.dp.accounting import PrivacyAccountant

        return PrivacyAccountant("rdp")

    def account_dp_round(self) -> dict[str, float]:
        """Record one round of DP noise and return ε so far at flower.dp.delta ({} when not accounted)."""
        if self.dp_accountant is None:
            return {}
        dp = self.flower.dp
        self.dp_accountant.step(dp.noise_multiplier, self.expected_sampled() / self.config.federation.clients)
        return {"dp_epsilon": self.dp_accountant.epsilon(dp.delta), "dp_delta": dp.delta}

    # -- a round ------------------------------------------------------------------------------------
    def play_round(self, round: int) -> dict[str, Any]:
        federation = self.federation
        started = time.perf_counter()
        online = self.nodes.wait_for(self.min_clients(), self.flower.wait_timeout)
        available = sorted(online)
        selected = federation.sample(round, available)
        strangers = [c for c in selected if c not in online]
        if strangers:
            raise AlgorithmError(
                f"algorithm '{federation.server.name}' sampled clients {strangers} that no online SuperNode serves",
                "on Flower an algorithm must sample among the available clients it is given",
            )
        self.recorder.progress.round_start(round, selected)
        plan = RoundPlan(round, {c: online[c] for c in selected}, {c: federation.configure(round, c) for c in selected})
        train_started = time.perf_counter()
        if self.secagg is not None:
            failures = self._secagg_round(plan)
        else:
            failures = self._plain_round(plan)
        train_seconds = time.perf_counter() - train_started - plan.aggregate_seconds
        updates = plan.updates
        for update in updates:
            self.recorder.progress.client_done(round, update.client_id, update.metrics)
        answered = {u.client_id for u in updates} | set(plan.refused)
        bytes_down = sum(federation.message_bytes(c, plan.downloads[c]) for c in selected)
        bytes_up = plan.bytes_up if self.secagg is None else len(updates) * (updates[0].state.nbytes() if updates else 0)
        record: dict[str, Any] = {
            "round": round,
            "clients": selected,
            "train": federation.train_summary(updates),
            "bytes_up": int(bytes_up),
            "bytes_down": int(bytes_down),
            "flower": {
                "online": available,
                "offline": [c for c in range(self.config.federation.clients) if c not in online],
                "dropped": sorted(c for c in selected if c not in answered),
                "failures": {str(c): reason for c, reason in sorted(failures.items())},
                "clientapp_seconds": self.clientapp_seconds,
            },
        }
        record.update(federation.round_extras(round))
        accounted = self.account_dp_round()
        if accounted:
            record.setdefault("protection", {}).update(accounted)
        eval_started = time.perf_counter()
        if federation.should_evaluate(round):
            record.update(federation.evaluate(round, round == self.config.federation.rounds, self.clients))
        record["seconds"] = {"train": train_seconds, "aggregate": plan.aggregate_seconds, "eval": time.perf_counter() - eval_started}
        record["wall_seconds"] = time.perf_counter() - started
        return record

    def _require_replies(self, plan: RoundPlan, replied: int, failures: dict[int, str]) -> None:
        needed = min(self.min_clients(), len(plan.nodes))
        if replied < needed:
            reasons = "; ".join(f"client {c}: {why}" for c, why in sorted(failures.items()))
            raise RoundFailed(
                f"round {plan.round}: {replied} of {len(plan.nodes)} sampled clients replied, fewer than the {needed} needed ({reasons})",
                "check the SuperNodes' logs, raise flower.round_timeout, or lower flower.min_available_clients",
            )

    def _plain_round(self, plan: RoundPlan) -> dict[int, str]:
        from flwr.app import ConfigRecord

        self.algorithm_strategy.plan = plan
        self.clientapp_seconds = {}
        tensors, _ = split_state(self.federation.server.global_state)
        messages = list(self.strategy.configure_train(plan.round, tensors_to_arrays(tensors), ConfigRecord(), self.grid))
        client_of = plan.client_of()
        by_client = {client_of[m.metadata.dst_node_id]: m for m in messages}
        replies, failures = exchange(self.grid, by_client, self.flower.round_timeout)
        self.clientapp_seconds = {str(c): protocol.timing_of(replies[c].content) for c in sorted(replies)}
        self._require_replies(plan, len(replies), failures)
        ordered = [replies[c] for c in sorted(replies)]
        arrays, _ = self.strategy.aggregate_train(plan.round, ordered)
        if arrays is None:
            raise RoundFailed(f"round {plan.round}: Flower's DP wrapper refused to aggregate (see the ServerApp log)")
        if self.strategy is not self.algorithm_strategy:
            adopt_aggregate(self.federation.server, arrays)
        return failures

    def _secagg_round(self, plan: RoundPlan) -> dict[int, str]:
        from flwr.app import ArrayRecord, ConfigRecord
        from flwr.server import ServerConfig
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        strategy = self.secagg
        strategy.plan, strategy.grid, strategy.run_id, strategy.aggregated = plan, self.grid, self.context.run_id, False
        self.clientapp_seconds = {}
        context = LegacyContext(self.context, config=ServerConfig(num_rounds=self.config.federation.rounds), strategy=strategy)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: plan.round, Key.START_TIME: time.time()})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        max_weight = max(self.federation.server.context.client_sizes)  # in a node-data run, as the nodes reported
        secagg_workflow(self.flower.secagg, max_weight, self.flower.round_timeout)(self.grid, context)
        answered = {u.client_id for u in plan.updates}
        failures = {c: "dropped out of the SecAgg+ protocol" for c in plan.nodes if c not in answered}
        if not strategy.aggregated:
            raise RoundFailed(
                f"round {plan.round}: SecAgg+ halted before unmasking (too few clients answered a stage)",
                "see the ServerApp log; raise flower.round_timeout or lower flower.secagg.reconstruction_threshold",
            )
        self._require_replies(plan, len(answered), failures)
        return failures

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        federation, recorder = self.federation, self.recorder
        rounds = self.config.federation.rounds
        recorder.start(rounds, 1)
        try:
            before = federation.server.evaluate(0) if self.config.eval.initial else {}
            recorder.record({"round": 0, "global": before, "bytes_up": 0, "bytes_down": 0, "wall_seconds": 0.0})
            for round in range(1, rounds + 1):
                record = self.play_round(round)
                recorder.record(record, report=False)
                federation.checkpoint(recorder.run_dir, round)
                recorder.report(record)
                if federation.stop_reason():
                    break
        finally:
            recorder.close()
        summary = federation.finish(recorder)
        summary["engine"] = {
            "name": "flower",
            "mode": self.flower.mode,
            "secagg": self.flower.secagg.enabled,
            "dp": self.flower.dp.mode,
            "dropped_updates": int(sum(len(r.get("flower", {}).get("dropped", [])) for r in recorder.records)),
        }
        accounted = [r["protection"] for r in recorder.records if "dp_epsilon" in r.get("protection", {})]
        if accounted:
            summary.setdefault("protection", {}).update(accounted[-1])
        counts = getattr(federation, "counts", None)
        if counts is not None:  # a node-data run: what the nodes reported of their own files
            summary["engine"]["client_examples"] = {str(c): {"train": t, "test": s} for c, (t, s) in sorted(counts.items())}
        recorder.write_summary(summary)
        return summary


# -- the ServerApp entry point ----------------------------------------------------------------------------

ERROR_FILE = "flower-error.txt"


def run_server(grid, context) -> None:
    """Build the federation from the resolved run it was handed, then run it (called by the
    ServerApp). In a node-data run the server reads no client data: at most its own test set."""
    from atoll.engines.flower.server_data import load_server_data, make_federation
    from atoll.experiment import build
    from atoll.report.progress import LogProgress
    from atoll.report.recorder import Recorder
    from atoll.report.rundir import RunDir

    run, run_dir_path = protocol.read_run_config(context.run_config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    path = Path(run_dir_path)
    RunDir.check_new(path)
    experiment = build(run, loaded=load_server_data(run.config) if run.config.flower.node_data else None)
    run_dir = None
    try:
        run_dir = RunDir.create(path, run.config, run.to_json())
        FlowerDriver(make_federation(experiment), Recorder(run_dir, LogProgress()), grid, context).run()
    except BaseException as error:
        if run_dir is not None:
            text = str(error) if isinstance(error, AtollError) else "".join(traceback.format_exception(error))
            (run_dir.path / ERROR_FILE).write_text(text)
        raise
    finally:
        experiment.close()
