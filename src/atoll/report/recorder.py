"""The one recorder of a run's numbers: metrics.jsonl as records happen, progress lines,
summary.json, and the metric plot. Every driver uses it, and so can runs that are not a
federation (split learning, hybrid inference): it knows a run directory and records, nothing else.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from atoll.report.divergence import DivergenceWatch
from atoll.report.progress import Progress
from atoll.report.rundir import RunDir


class Recorder:
    """Records of one run, written to ``run_dir``.

    ``synced``: every metrics line is flushed and fsynced when written (runs with training; a
    killed run loses nothing it reported). Unsynced (dry runs with thousands of cheap rounds), lines
    are buffered and progress is reported at most every two seconds.
    """

    def __init__(self, run_dir: RunDir, progress: Progress | None = None, synced: bool = True, records: list[dict] | None = None):
        self.run_dir = run_dir
        self.progress = progress or Progress()
        self.synced = synced
        self.records: list[dict[str, Any]] = list(records or [])
        self._handle = None if synced else open(run_dir.path / "metrics.jsonl", "a")
        self._last_report = 0.0
        self.seconds = 0.0  # wall seconds spent writing records
        self.divergence = DivergenceWatch(self.records)

    @property
    def path(self) -> Path:
        return self.run_dir.path

    def start(self, rounds: int, first_round: int = 1) -> None:
        self.progress.start(rounds, first_round)

    def record(self, record: dict[str, Any], report: bool = True) -> None:
        """Keep ``record``, append it to metrics.jsonl and report it (round 0 and final
        re-evaluations are written but not reported as rounds). ``report=False`` leaves the
        report to :meth:`report` (the synchronous loop reports a round after its checkpoint).
        A record whose train loss diverged is written, then the run stops with a DivergenceError."""
        started = time.perf_counter()
        self.records.append(record)
        if self.synced:
            self.run_dir.append_metrics(record)
        else:
            self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        if report and record["round"] > 0 and not record.get("final_evaluation"):
            if self.synced or started - self._last_report > 2.0:
                self._last_report = started
                self.progress.round_end(record["round"], record)
        self.seconds += time.perf_counter() - started
        self.divergence.observe(record, str(self.path))

    def report(self, record: dict[str, Any]) -> None:
        """Report a round already written with ``report=False``."""
        self.progress.round_end(record["round"], record)

    def close(self) -> None:
        """Flush buffered lines and end the progress display."""
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
        self.progress.close()

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.run_dir.write_summary(summary)

    def plot_metric(self, metric: str, title: str, reference: float | None = None, name: str = "metrics.png") -> None:
        """The metric (and train loss) against the round, with an optional reference line."""
        from atoll.report import plots

        plots.plot_metrics(self.records, metric, self.path / name, title, reference)
