"""The synchronous loop: rounds of sample -> configure -> local runs -> receive -> aggregate,
evaluation every N rounds, a checkpoint per round, and resume to identical final metrics.

A thin driver over :class:`~atoll.fl.federation.Federation`: it only decides the order of the
steps and times them; the event simulation and Flower drive the same federation otherwise.
"""

from __future__ import annotations

import time
from typing import Any

from atoll.fl.federation import Federation, InProcessClients
from atoll.report.recorder import Recorder


class SynchronousLoop:
    """Round after round, every sampled client trained in this process."""

    def __init__(self, federation: Federation, recorder: Recorder):
        self.federation = federation
        self.recorder = recorder
        self.clients = InProcessClients(federation)
        self.config = federation.config

    def play_round(self, round: int) -> dict[str, Any]:
        federation = self.federation
        started = time.perf_counter()
        selected = federation.sample(round, federation.real_client_ids)
        self.recorder.progress.round_start(round, selected)
        updates = []
        bytes_up = bytes_down = 0
        train_started = time.perf_counter()
        for client_id in selected:
            download = federation.configure(round, client_id)
            update = federation.train(round, client_id, download)
            bytes_down += federation.message_bytes(client_id, download)
            bytes_up += federation.upload_cost(update)[0]
            received = federation.receive(round, update)
            if received is not None:
                updates.append(received)
            self.recorder.progress.client_done(round, client_id, update.metrics)
        train_seconds = time.perf_counter() - train_started
        aggregate_started = time.perf_counter()
        federation.aggregate(round, updates)
        aggregate_seconds = time.perf_counter() - aggregate_started
        record: dict[str, Any] = {
            "round": round,
            "clients": selected,
            "train": federation.train_summary(updates),
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
        }
        record.update(federation.round_extras(round))
        eval_started = time.perf_counter()
        if federation.should_evaluate(round):
            record.update(federation.evaluate(round, round == self.config.federation.rounds, self.clients))
        record["seconds"] = {"train": train_seconds, "aggregate": aggregate_seconds, "eval": time.perf_counter() - eval_started}
        record["wall_seconds"] = time.perf_counter() - started
        return record

    def run(self, first_round: int = 1) -> dict[str, Any]:
        federation, recorder = self.federation, self.recorder
        rounds = self.config.federation.rounds
        recorder.start(rounds, first_round)
        try:
            if first_round == 1:
                before = federation.server.evaluate(0) if self.config.eval.initial else {}
                recorder.record({"round": 0, "global": before, "bytes_up": 0, "bytes_down": 0, "wall_seconds": 0.0})
            for round in range(first_round, rounds + 1):
                record = self.play_round(round)
                recorder.record(record, report=False)
                federation.checkpoint(recorder.run_dir, round)
                recorder.report(record)
                if federation.stop_reason():
                    break
        finally:
            recorder.close()
        return federation.finish(recorder)
