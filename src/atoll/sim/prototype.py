"""The prototype runner: synchronous rounds of sample -> configure -> local runs -> aggregate,
evaluation every N rounds, a checkpoint per round, and resume to identical final metrics."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from atoll.fl.capabilities import POOLED_CLIENT
from atoll.config import Config
from atoll.experiment import Experiment
from atoll.fl.state import Update, check_finite, example_weights
from atoll.report import plots
from atoll.report.progress import Progress
from atoll.report.rundir import RunDir


def config_digest(config: Config) -> str:
    return hashlib.sha256(config.to_yaml().encode()).hexdigest()[:16]


def weighted_mean(rows: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Mean of each metric over rows of (weight, metrics)."""
    total = sum(w for w, _ in rows)
    keys = sorted({k for _, m in rows for k in m if k != "examples"})
    result = {}
    for key in keys:
        present = [(w, m[key]) for w, m in rows if key in m]
        weight = sum(w for w, _ in present) or 1.0
        result[key] = float(sum(w * v for w, v in present) / weight)
    if total:
        result["examples"] = float(total)
    return result


def write_adapter(workbench, state, directory: Path) -> None:
    """``state`` in PEFT format, plus base_delta.safetensors when it changes base weights."""
    workbench.save_peft(state, directory)
    if state.base:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.base.items()}, str(directory / "base_delta.safetensors"))


class PrototypeRunner:
    def __init__(self, experiment: Experiment, run_dir: RunDir, progress: Progress):
        self.experiment = experiment
        self.run_dir = run_dir
        self.progress = progress
        self.config = experiment.config
        self.records: list[dict[str, Any]] = []

    # -- one round ---------------------------------------------------------------------------------
    def should_evaluate(self, round: int) -> bool:
        return round == self.config.federation.rounds or round % self.config.eval.every == 0

    def local_evaluation(self, round: int) -> dict[str, Any]:
        server = self.experiment.server
        rows = []
        per_client = {}
        for client_id in self.experiment.real_client_ids:
            client = self.experiment.clients[client_id]
            if len(client.context.test_indices) == 0:
                continue
            metrics = client.evaluate(server.configure(round, client_id))
            rows.append((float(len(client.context.test_indices)), metrics))
            per_client[str(client_id)] = metrics
        summary = weighted_mean(rows) if rows else {}
        metric = self.main_metric()
        if rows and metric in summary:
            values = [m[metric] for _, m in rows if metric in m]
            summary[f"{metric}_min"] = float(min(values))
            summary[f"{metric}_std"] = float(np.std(values))
        if len(per_client) <= 100:
            summary["per_client"] = {c: m.get(metric) for c, m in per_client.items()}
        return summary

    def personal_global_evaluation(self) -> dict[str, float]:
        """For algorithms without a global model: mean over clients of their own adapter on the
        global test set."""
        server = self.experiment.server
        rows = []
        for client_id in self.experiment.real_client_ids:
            client = self.experiment.clients[client_id]
            rows.append(
                (1.0, client.evaluate(server.configure(self.config.federation.rounds, client_id), self.experiment.splits.global_test))
            )
        result = weighted_mean(rows)
        result.pop("examples", None)
        return result

    def export_personal(self, directory: Path) -> None:
        """Each client's personal adapter, as its local evaluation uses it, in PEFT format."""
        server = self.experiment.server
        round = self.records[-1]["round"] if self.records else self.config.federation.rounds
        for client_id in self.experiment.real_client_ids:
            state = self.experiment.clients[client_id].personal_adapter(server.configure(round, client_id))
            write_adapter(self.experiment.workbench, state, directory / f"client_{client_id}")

    def main_metric(self) -> str:
        return {"classification": "accuracy", "math": "exact_match", "sft": "loss"}[self.experiment.spec.kind]

    @staticmethod
    def train_summary(updates: list[Update]) -> dict[str, float]:
        """Example-weighted mean train loss, total steps and examples of a round's updates."""
        weights = example_weights(updates) if updates else []
        return {
            "loss": float(sum(w * u.metrics.get("loss", 0.0) for w, u in zip(weights, updates))),
            "steps": float(sum(u.metrics.get("steps", 0.0) for u in updates)),
            "examples": float(sum(u.metrics.get("examples", 0.0) for u in updates)),
        }

    def evaluate_round(self, round: int) -> dict[str, Any]:
        """The round's "global" and "local" metrics, on the rounds that are evaluated."""
        if not self.should_evaluate(round):
            return {}
        server = self.experiment.server
        final = round == self.config.federation.rounds
        result: dict[str, Any] = {"global": server.evaluate(round)}
        if not result["global"] and final and not server.capabilities.global_model:
            result["global"] = self.personal_global_evaluation()
        local = self.config.eval.local
        if local == "always" or (local == "final" and final):
            result["local"] = self.local_evaluation(round)
        return result

    def play_round(self, round: int) -> dict[str, Any]:
        server = self.experiment.server
        started = time.perf_counter()
        selected = server.sample(round, self.experiment.real_client_ids)
        self.progress.round_start(round, selected)
        updates: list[Update] = []
        bytes_up = bytes_down = 0
        train_started = time.perf_counter()
        for client_id in selected:
            download = server.configure(round, client_id)
            update = self.experiment.clients[client_id].run(round, download)
            check_finite(update)
            if client_id != POOLED_CLIENT:
                bytes_down += download.nbytes()
                bytes_up += update.state.nbytes()
            updates.append(update)
            self.progress.client_done(round, client_id, update.metrics)
        train_seconds = time.perf_counter() - train_started
        aggregate_started = time.perf_counter()
        server.aggregate(round, updates)
        aggregate_seconds = time.perf_counter() - aggregate_started
        record: dict[str, Any] = {
            "round": round,
            "clients": selected,
            "train": self.train_summary(updates),
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
        }
        eval_started = time.perf_counter()
        record.update(self.evaluate_round(round))
        record["seconds"] = {
            "train": train_seconds,
            "aggregate": aggregate_seconds,
            "eval": time.perf_counter() - eval_started,
        }
        record["wall_seconds"] = time.perf_counter() - started
        return record

    # -- whole run -----------------------------------------------------------------------------------
    def checkpoint(self, round: int) -> None:
        self.run_dir.save_checkpoint(
            round,
            self.experiment.server.state_dict(),
            self.experiment.store.save,
            {"config": config_digest(self.config)},
            self.config.run.keep_checkpoints,
        )

    def run(self, first_round: int = 1) -> dict[str, Any]:
        rounds = self.config.federation.rounds
        self.progress.start(rounds, first_round)
        try:
            if first_round == 1:
                before = self.experiment.server.evaluate(0) if self.config.eval.initial else {}
                initial = {"round": 0, "global": before, "bytes_up": 0, "bytes_down": 0, "wall_seconds": 0.0}
                self.run_dir.append_metrics(initial)
                self.records.append(initial)
            for round in range(first_round, rounds + 1):
                record = self.play_round(round)
                self.run_dir.append_metrics(record)
                self.records.append(record)
                self.checkpoint(round)
                self.progress.round_end(round, record)
        finally:
            self.progress.close()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        experiment = self.experiment
        server = experiment.server
        metric = self.main_metric()
        evaluated = [r for r in self.records if r.get("global") and r["round"] > 0]
        last = self.records[-1]
        final_global = last.get("global") or {}
        majority = experiment.majority_rate()
        summary: dict[str, Any] = {
            "name": self.config.name,
            "algorithm": self.config.algorithm.name,
            "model": self.config.model.name,
            "data": self.config.data.source,
            "task": experiment.spec.kind,
            "metric": metric,
            "clients": self.config.federation.clients,
            "rounds": self.config.federation.rounds,
            "final_global": final_global,
            "final_local": {k: v for k, v in (last.get("local") or {}).items() if k != "per_client"},
            "initial_global": (self.records[0].get("global") or {}) if self.records and self.records[0]["round"] == 0 else {},
            "bytes_up_total": int(sum(r.get("bytes_up", 0) for r in self.records)),
            "bytes_down_total": int(sum(r.get("bytes_down", 0) for r in self.records)),
            "wall_seconds_rounds": float(sum(r.get("wall_seconds", 0.0) for r in self.records)),
            "trainable_parameters": experiment.workbench.trainable_parameter_count(),
            "global_test_examples": int(len(experiment.splits.global_test)),
            "run_dir": str(self.run_dir.path),
        }
        local_majority = experiment.local_majority_rate()
        if local_majority is not None:
            summary["local_majority_rate"] = local_majority
        if majority is not None:
            summary["majority_class_rate"] = majority
            if metric in final_global:
                summary["gain_over_majority"] = final_global[metric] - majority
        if evaluated and metric in evaluated[-1]["global"]:
            better = min if metric == "loss" else max
            summary["best_global"] = better(r["global"][metric] for r in evaluated if metric in r["global"])
        self.run_dir.write_summary(summary)
        title = f"{self.config.algorithm.name} on {self.config.data.source} ({self.config.federation.clients} clients)"
        if self.config.run.plots:
            plots.plot_metrics(self.records, metric, self.run_dir.path / "metrics.png", title, majority)
            plots.plot_label_distribution(
                experiment.splits.label_table,
                experiment.spec.label_names,
                self.run_dir.path / "label_distribution.png",
                f"{self.config.partition.name} partition",
            )
        if self.config.run.export_personal:
            self.run_dir.replace_dir("personal", self.export_personal)
        if server.capabilities.global_model:
            state = server.global_state
            self.run_dir.replace_dir("adapter", lambda staging: write_adapter(experiment.workbench, state, staging))
        return summary
