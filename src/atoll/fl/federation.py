"""One federation: a run's state and the steps of a round, shared by every driver.

A :class:`Federation` owns the server, the clients (where they live in this process), the
protection stages and the client behaviours, and offers the steps of a round:

    sample -> configure -> train (client side) -> receive -> aggregate -> evaluate -> record -> checkpoint

The drivers are thin loops over these steps: the synchronous loop (:mod:`atoll.sim.prototype`)
calls them round by round; the event simulation (:mod:`atoll.sim.realistic`) calls them when
events fire; Flower's ServerApp calls the server-side steps and its ClientApps call the
client-side ones (:mod:`atoll.engines.flower`). How a driver reaches its clients is a
:class:`ClientAccess`: in this process (:class:`InProcessClients`) or over Flower's messages.
The federation never sleeps, reads a clock for its results, or opens a socket.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from atoll.errors import CheckpointError
from atoll.fl.capabilities import POOLED_CLIENT
from atoll.fl.stages import Stages
from atoll.fl.state import AdapterState, Update, example_weights

MAIN_METRIC = {"classification": "accuracy", "math": "exact_match", "sft": "loss", "completion": "loss"}


def config_digest(config) -> str:
    """Which config a checkpoint was written with (resume refuses another one)."""
    return hashlib.sha256(config.to_yaml().encode()).hexdigest()[:16]


def weighted_mean(rows: list[tuple[float, dict[str, float]]], independent: bool = True) -> dict[str, float]:
    """Mean of each metric over rows of (weight, metrics). A standard error (``*_se``) of the mean
    of ``independent`` estimates is sqrt(sum w^2 se^2) / sum w (clients on their own test splits);
    of estimates on one shared test set, the mean of the standard errors (an upper bound)."""
    total = sum(w for w, _ in rows)
    keys = sorted({k for _, m in rows for k in m if k != "examples"})
    result = {}
    for key in keys:
        present = [(w, m[key]) for w, m in rows if key in m]
        weight = sum(w for w, _ in present) or 1.0
        if key == "tokens" and independent:  # disjoint test splits: the tokens they hold together
            result[key] = float(sum(v for _, v in present))
        elif key.endswith("_se") and independent:
            result[key] = float(np.sqrt(sum((w * v) ** 2 for w, v in present)) / weight)
        else:
            result[key] = float(sum(w * v for w, v in present) / weight)
    if total:
        result["examples"] = float(total)
    return result


def write_adapter(workbench, state: AdapterState, directory: Path) -> None:
    """``state`` in PEFT format, plus base_delta.safetensors when it changes base weights."""
    workbench.save_peft(state, directory)
    if state.base:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.base.items()}, str(directory / "base_delta.safetensors"))


class ClientAccess(Protocol):
    """How a driver reaches clients for evaluation: ``{client_id: metrics}`` of those that answered
    (``scope`` "local": the client's own test split; "global": the global test set)."""

    def evaluate(self, round: int, client_ids: list[int], scope: str) -> dict[int, dict[str, float]]: ...


class Federation:
    """The state of one run and the steps of its rounds (see the module docstring)."""

    def __init__(self, experiment, stages: Stages | None = None, side: str = "both"):
        self.experiment = experiment
        self.config = experiment.config
        self.server = experiment.server
        self.clients = experiment.clients
        self.capabilities = self.server.capabilities
        if stages is None:
            from atoll.privacy.seams.wiring import protection_stages  # privacy:, robust: and attack: of the config

            # side: "both" in one process; on Flower the ServerApp builds the server's, a ClientApp the clients'
            stages = protection_stages(experiment, Stages.from_config(self.config, self.capabilities), side)
        self.stages = stages
        self.metric = MAIN_METRIC[experiment.spec.kind]
        self.dropped: list[dict[str, Any]] = []  # updates a receive stage refused since the last record

    @property
    def real_client_ids(self) -> list[int]:
        return self.experiment.real_client_ids

    def close(self) -> None:
        """Release the experiment (the client store's spill directory)."""
        self.experiment.close()

    # -- server side: who, what, and what comes back ------------------------------------------------
    def sample(self, round: int, available: list[int]) -> list[int]:
        return self.server.sample(round, [int(c) for c in available])

    def configure(self, round: int, client_id: int) -> AdapterState:
        return self.server.configure(round, client_id)

    def message_bytes(self, client_id: int, state: AdapterState) -> int:
        """Bytes a message to or from ``client_id`` costs (the pooled client's moves nothing)."""
        return 0 if client_id == POOLED_CLIENT else state.nbytes()

    def upload_cost(self, update: Update) -> tuple[int, int]:
        """(bytes, extra message round trips) of an upload, protections included."""
        if update.client_id == POOLED_CLIENT:
            return 0, 0
        extra_bytes, extra_trips = self.stages.upload_cost(update)
        return update.state.nbytes() + extra_bytes, extra_trips

    def receive(self, round: int, update: Update) -> Update | None:
        """Run the receive stages on ``update``; None when one of them drops it (recorded)."""
        reason = self.stages.on_receive(round, update)
        if reason:
            self.dropped.append({"client": update.client_id, "reason": reason})
            return None
        return update

    def aggregate(self, round: int, updates: list[Update]) -> None:
        """The algorithm's aggregation (or a stage's in its place), then the after-aggregation stages."""
        self.stages.aggregate(round, updates, self.server)

    def aggregate_async(self, version: int, update: Update, staleness: int, rule) -> None:
        self.server.aggregate_async(version, update, staleness, rule)

    def aggregate_buffered(self, version: int, updates: list[Update], staleness: list[int], starts: list[AdapterState], rule) -> None:
        self.server.aggregate_buffered(version, updates, staleness, starts, rule)

    # -- client side (in this process; a Flower ClientApp calls the same on its node) ---------------
    def train(self, round: int, client_id: int, download: AdapterState) -> Update:
        """Local training of ``client_id`` from ``download``: its behaviour, the algorithm's client
        with the stages' training hooks, then the stages that act before upload."""
        client = self.clients[client_id]
        workbench = self.experiment.workbench
        workbench.stage_hooks = self.stages.training_hooks(round, client_id)
        try:
            return self.stages.train(round, client_id, download, lambda: client.run(round, download))
        finally:
            workbench.stage_hooks = []

    def evaluate_client(self, round: int, client_id: int, download: AdapterState, scope: str) -> dict[str, float]:
        """Metrics of the model ``client_id`` would use, on its test split or the global test set."""
        indices = self.experiment.splits.global_test if scope == "global" else None
        return self.clients[client_id].evaluate(download, indices)

    def test_examples(self, client_id: int) -> int:
        """Size of ``client_id``'s local test split (where its data lives elsewhere, as its node reported it)."""
        return len(self.clients[client_id].context.test_indices)

    def local_client_ids(self) -> list[int]:
        """Clients with a local test split (those local evaluation asks)."""
        return [c for c in self.real_client_ids if self.test_examples(c)]

    # -- records -------------------------------------------------------------------------------------
    def should_evaluate(self, round: int) -> bool:
        """Every ``eval.every`` rounds, the last round, and a round after which a stage ends the run
        (a privacy budget): the model it leaves is evaluated."""
        return round == self.config.federation.rounds or round % self.config.eval.every == 0 or self.stop_reason() is not None

    def train_summary(self, updates: list[Update]) -> dict[str, float]:
        """Example-weighted mean train loss, total steps and examples of a round's updates."""
        weights = example_weights(updates) if updates else []
        return {
            "loss": float(sum(w * u.metrics.get("loss", 0.0) for w, u in zip(weights, updates))),
            "steps": float(sum(u.metrics.get("steps", 0.0) for u in updates)),
            "examples": float(sum(u.metrics.get("examples", 0.0) for u in updates)),
        }

    def round_extras(self, round: int) -> dict[str, Any]:
        """What the stages add to a round record: dropped updates and stage metrics (nothing by default)."""
        extras: dict[str, Any] = {}
        if self.dropped:
            extras["dropped_updates"], self.dropped = self.dropped, []
        metrics = self.stages.round_metrics(round)
        if metrics:
            extras["protection"] = metrics
        return extras

    def stop_reason(self) -> str | None:
        return self.stages.stop_reason()

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, round: int, final: bool, clients: ClientAccess) -> dict[str, Any]:
        """The round's "global" metrics (the server's model, or for algorithms without one the mean
        of the clients' own models at the final round) and "local" ones per ``eval.local``."""
        result: dict[str, Any] = {"global": self.server.evaluate(round)}
        if not result["global"] and final and not self.capabilities.global_model:
            result["global"] = self.personal_global_evaluation(clients)
        local = self.config.eval.local
        if round > 0 and (local == "always" or (local == "final" and final)):
            result["local"] = self.local_evaluation(round, clients)
        return result

    def local_evaluation(self, round: int, clients: ClientAccess) -> dict[str, Any]:
        """Every client's model on its own test split: means weighted by split size, the worst
        client, the spread, and (up to 100 clients) each client's main metric."""
        asked = self.local_client_ids()
        results = clients.evaluate(round, asked, "local")
        rows = [(float(self.test_examples(c)), metrics) for c, metrics in results.items()]
        summary = weighted_mean(rows) if rows else {}
        metric = self.metric
        if rows and metric in summary:
            values = [m[metric] for _, m in rows if metric in m]
            summary[f"{metric}_min"] = float(min(values))
            summary[f"{metric}_std"] = float(np.std(values))
        if len(results) <= 100:
            summary["per_client"] = {str(c): m.get(metric) for c, m in results.items()}
        missing = sorted(set(asked) - set(results))
        if missing:
            summary["missing_clients"] = missing
        return summary

    def personal_global_evaluation(self, clients: ClientAccess) -> dict[str, float]:
        """For algorithms without a global model: the mean over clients of their own model on the
        global test set."""
        results = clients.evaluate(self.config.federation.rounds, list(self.real_client_ids), "global")
        result = weighted_mean([(1.0, metrics) for metrics in results.values()], independent=False)
        result.pop("examples", None)
        return result

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self, run_dir, round: int) -> None:
        run_dir.save_checkpoint(
            round,
            self.server.state_dict(),
            self.experiment.store.save,
            {"config": config_digest(self.config), "stages": self.stages.state()},
            self.config.run.keep_checkpoints,
        )

    def restore(self, run_dir) -> int:
        """Load the newest checkpoint of ``run_dir``; the round it ended (0 when there is none)."""
        rounds = run_dir.checkpoint_rounds()
        if not rounds:
            return 0
        last = rounds[-1]
        tensors, clients_dir, meta = run_dir.load_checkpoint(last)
        if meta.get("config") != config_digest(self.config):
            raise CheckpointError(f"checkpoint of round {last} was written with another config", "start a new run")
        self.server.load_state_dict(tensors)
        self.experiment.store.load(clients_dir)
        self.stages.load_state(meta.get("stages", {}))
        return last

    # -- the run's outputs ---------------------------------------------------------------------------
    def summary(self, records: list[dict[str, Any]], run_dir) -> dict[str, Any]:
        """Final metrics, majority-class references, traffic and timings of a finished run."""
        experiment, config, metric = self.experiment, self.config, self.metric
        evaluated = [r for r in records if r.get("global") and r["round"] > 0]
        last = records[-1]
        final_global = last.get("global") or {}
        majority = experiment.majority_rate()
        summary: dict[str, Any] = {
            "name": config.name,
            "algorithm": config.algorithm.name,
            "model": config.model.name,
            "data": config.data.source,
            "task": experiment.spec.kind,
            "metric": metric,
            "clients": config.federation.clients,
            "rounds": config.federation.rounds,
            "final_global": final_global,
            "final_local": {k: v for k, v in (last.get("local") or {}).items() if k != "per_client"},
            "initial_global": (records[0].get("global") or {}) if records and records[0]["round"] == 0 else {},
            "bytes_up_total": int(sum(r.get("bytes_up", 0) for r in records)),
            "bytes_down_total": int(sum(r.get("bytes_down", 0) for r in records)),
            "wall_seconds_rounds": float(sum(r.get("wall_seconds", 0.0) for r in records)),
            "trainable_parameters": experiment.workbench.trainable_parameter_count(),
            "global_test_examples": int(len(experiment.splits.global_test)),
            "run_dir": str(run_dir.path),
        }
        local_majority = experiment.local_majority_rate()
        if local_majority is not None:
            summary["local_majority_rate"] = local_majority
        if majority is not None:
            summary["majority_class_rate"] = majority
            if metric in final_global:
                summary["gain_over_majority"] = final_global[metric] - majority
        protection: dict[str, Any] = {}
        for record in records:  # each key's latest value: epsilon spent, attack success, ...
            protection.update(record.get("protection") or {})
        if protection:
            summary["protection"] = protection
        stopped = self.stop_reason()
        if stopped and last["round"] < config.federation.rounds:
            summary["stopped_early"] = stopped
        if evaluated and metric in evaluated[-1]["global"]:
            better = min if metric == "loss" else max
            summary["best_global"] = better(r["global"][metric] for r in evaluated if metric in r["global"])
        return summary

    def finish(self, recorder, title: str | None = None) -> dict[str, Any]:
        """Write summary.json, the plots, the personal adapters (``run.export_personal``) and the
        global adapter in PEFT format; return the summary."""
        experiment, config, run_dir = self.experiment, self.config, recorder.run_dir
        summary = self.summary(recorder.records, run_dir)
        recorder.write_summary(summary)
        if config.run.plots:
            title = title or f"{config.algorithm.name} on {config.data.source} ({config.federation.clients} clients)"
            recorder.plot_metric(self.metric, title, experiment.majority_rate())
            from atoll.report import plots

            if experiment.splits.label_table is not None:  # None: the clients' data is on their nodes
                plots.plot_label_distribution(
                    experiment.splits.label_table,
                    experiment.spec.label_names,
                    run_dir.path / "label_distribution.png",
                    f"{config.partition.name} partition",
                )
        if config.run.export_personal:
            round = recorder.records[-1]["round"] if recorder.records else config.federation.rounds
            run_dir.replace_dir("personal", lambda staging: self.export_personal(staging, round))
        if self.capabilities.global_model:
            state = self.server.global_state
            run_dir.replace_dir("adapter", lambda staging: write_adapter(experiment.workbench, state, staging))
        return summary

    def export_personal(self, directory: Path, round: int) -> None:
        """Each client's personal adapter, as its local evaluation uses it, in PEFT format."""
        for client_id in self.real_client_ids:
            state = self.clients[client_id].personal_adapter(self.configure(round, client_id))
            write_adapter(self.experiment.workbench, state, directory / f"client_{client_id}")


class InProcessClients:
    """The clients of a federation built in this process (the synchronous loop, the event simulation)."""

    def __init__(self, federation: Federation):
        self.federation = federation

    def evaluate(self, round: int, client_ids: list[int], scope: str) -> dict[int, dict[str, float]]:
        federation = self.federation
        return {c: federation.evaluate_client(round, c, federation.configure(round, c), scope) for c in client_ids}
