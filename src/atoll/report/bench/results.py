"""What the table and the plots read from a finished cell's run directory, and the statistics of a
row (one algorithm on one task and partition, over its seeds)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atoll.report.bench.runner import CELL_TIMES
from atoll.report.bench.stats import Interval, binomial_se, mean_interval, paired_interval


def metric_value(metrics: dict[str, float], name: str) -> float | None:
    return float(metrics[name]) if name in metrics else None


def metric_se(metrics: dict[str, float], name: str) -> float | None:
    """The test-set standard error of ``metrics[name]``: recorded by the evaluation (``*_se``),
    perplexity's by the delta method from the loss's (se(exp L) = exp(L) se(L)), an accuracy's
    binomial one from the example count when the run predates recorded errors."""
    if name not in metrics:
        return None
    if f"{name}_se" in metrics:
        return float(metrics[f"{name}_se"])
    if name == "perplexity" and "loss_se" in metrics:
        return float(metrics["perplexity"] * metrics["loss_se"])
    if name == "accuracy" and "examples" in metrics:
        return binomial_se(float(metrics["accuracy"]), float(metrics["examples"]))
    return None


@dataclass
class CellResult:
    """One finished run of the benchmark."""

    summary: dict[str, Any]
    records: list[dict[str, Any]]
    times: dict[str, float]

    @classmethod
    def load(cls, directory: Path) -> "CellResult | None":
        if not (directory / "summary.json").is_file():
            return None
        summary = json.loads((directory / "summary.json").read_text())
        records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
        times = json.loads((directory / CELL_TIMES).read_text()) if (directory / CELL_TIMES).is_file() else {}
        return cls(summary, records, times)

    def final(self, scope: str, metric: str) -> float | None:
        return metric_value(self.summary[f"final_{scope}"], metric)

    def final_se(self, scope: str, metric: str) -> float | None:
        return metric_se(self.summary[f"final_{scope}"], metric)

    def curve(self, metric: str) -> list[tuple[int, float, float]]:
        """(round, global metric, megabytes sent up and down so far) at every evaluated round."""
        points, sent = [], 0.0
        for record in self.records:
            sent += (record.get("bytes_up", 0) + record.get("bytes_down", 0)) / 1e6
            value = metric_value(record.get("global") or {}, metric)
            if value is not None:
                points.append((int(record["round"]), value, sent))
        return points

    def reached(self, metric: str, target: float, lower_is_better: bool) -> tuple[int, float] | None:
        """(round, megabytes so far) of the first evaluated round after training began whose global
        metric reaches ``target``."""
        for round, value, sent in self.curve(metric):
            if round > 0 and (value <= target if lower_is_better else value >= target):
                return round, sent
        return None

    @property
    def rounds(self) -> int:
        return int(self.summary["rounds"])

    def megabytes_per_round(self, direction: str) -> float:
        return self.summary[f"bytes_{direction}_total"] / self.rounds / 1e6

    def seconds_per_round(self) -> float | None:
        """Mean wall seconds of a round's training and aggregation (evaluation excluded)."""
        times = [r["seconds"]["train"] + r["seconds"]["aggregate"] for r in self.records if r.get("round", 0) > 0 and "seconds" in r]
        return statistics.fmean(times) if times else None


@dataclass
class Row:
    """One algorithm on one task and partition: its seeds' results and their statistics."""

    algorithm: str
    results: dict[int, CellResult]
    failures: dict[int, str] = field(default_factory=dict)

    def values(self, scope: str, metric: str) -> dict[int, float]:
        return {seed: v for seed, r in self.results.items() if (v := r.final(scope, metric)) is not None}

    def interval(self, scope: str, metric: str) -> Interval:
        return mean_interval(list(self.values(scope, metric).values()))

    def se(self, scope: str, metric: str) -> float | None:
        """The mean over seeds of the figure's test-set standard error."""
        errors = [e for r in self.results.values() if (e := r.final_se(scope, metric)) is not None and not math.isnan(e)]
        return statistics.fmean(errors) if errors else None

    def difference(self, reference: "Row", scope: str, metric: str) -> Interval:
        return paired_interval(self.values(scope, metric), reference.values(scope, metric))

    def target(self, metric: str, target: float, lower_is_better: bool) -> tuple[float | None, float | None, int]:
        """(mean rounds, mean megabytes) to the target over the seeds that reach it, and how many do."""
        hits = [hit for r in self.results.values() if (hit := r.reached(metric, target, lower_is_better)) is not None]
        if not hits:
            return None, None, 0
        return statistics.fmean(h[0] for h in hits), statistics.fmean(h[1] for h in hits), len(hits)

    def mean_of(self, function) -> float | None:
        values = [v for r in self.results.values() if (v := function(r)) is not None]
        return statistics.fmean(values) if values else None
