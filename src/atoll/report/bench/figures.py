"""The comparison's plots: final figures with their 95 % intervals (algorithms.png), and per task
the global metric against rounds and against megabytes sent, one panel per partition
(algorithms-curves-<task>.png)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from atoll.report.bench.results import Row
from atoll.report.bench.tables import label


def names(record: dict) -> dict[str, str]:
    return {task: f"algorithms-curves-{task}.png" for task in record["tasks"]}


def _style(index: int) -> dict:
    import matplotlib

    colors = list(matplotlib.colormaps["tab20"].colors) + list(matplotlib.colormaps["tab20b"].colors)
    return {"color": colors[index % len(colors)], "linestyle": ("-", "--", ":", "-.")[index // 10 % 4]}


def _mean_curve(row: Row, metric: str) -> list[tuple[int, float, float]]:
    """(round, mean metric, mean megabytes so far) over the seeds, at the rounds every seed evaluated
    (round 0 included: the untrained model is where every curve starts)."""
    curves = [{round: (value, sent) for round, value, sent in r.curve(metric)} for r in row.results.values()]
    if not curves:
        return []
    rounds = sorted(set.intersection(*(set(c) for c in curves)))
    return [(rd, statistics.fmean(c[rd][0] for c in curves), statistics.fmean(c[rd][1] for c in curves)) for rd in rounds]


def draw(record: dict, rows: dict[tuple[str, str], list[Row]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _bars(record, rows, out / "algorithms.png", plt)
    for task, filename in names(record).items():
        _curves(record, task, rows, out / filename, plt)


def _curves(record: dict, task: str, rows: dict[tuple[str, str], list[Row]], path: Path, plt) -> None:
    spec = record["tasks"][task]
    metric, target = spec["spec"]["metric"], spec["spec"]["target"]
    partitions = list(spec["partitions"])
    figure, axes = plt.subplots(2, len(partitions), figsize=(6.5 * len(partitions) + 2.5, 8.5), squeeze=False)
    for column, partition in enumerate(partitions):
        for index, row in enumerate(rows[(task, partition)]):
            curve = _mean_curve(row, metric)
            if not curve:
                continue
            style = _style(index)
            marker = "o" if len(curve) == 1 else None
            rounds, values, sent = zip(*curve)
            axes[0][column].plot(rounds, values, marker=marker, label=row.algorithm, linewidth=1.2, **style)
            axes[1][column].plot(sent, values, marker=marker, linewidth=1.2, **style)
        for line, axis in enumerate(axes[:, column]):
            axis.axhline(target, color="grey", linewidth=0.8, linestyle=":")
            axis.set_ylabel(f"global {label(metric)}")
            axis.grid(alpha=0.3)
            axis.set_title(f"{task} / {partition}")
            axis.set_xlabel("round" if line == 0 else "megabytes sent (up + down, cumulative; centralized sends none)")
            if metric == "perplexity":
                axis.set_yscale("log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0, 1 - 2.3 / (6.5 * len(partitions) + 2.5), 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _bars(record: dict, rows: dict[tuple[str, str], list[Row]], path: Path, plt) -> None:
    import numpy as np

    panels = [(task, partition) for task, spec in record["tasks"].items() for partition in spec["partitions"]]
    most = max((len(rows[p]) for p in panels), default=1)
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 0.3 * most + 1.8), squeeze=False)
    for axis, (task, partition) in zip(axes[0], panels):
        metric = record["tasks"][task]["spec"]["metric"]
        group = rows[(task, partition)]
        positions = np.arange(len(group))
        for offset, (scope, color, name) in enumerate((("global", "tab:blue", "global"), ("local", "tab:orange", "personalized"))):
            intervals = [row.interval(scope, metric) for row in group]
            means = [i.mean if i.n else math.nan for i in intervals]
            halves = [i.half if i.n > 1 else 0.0 for i in intervals]
            axis.barh(positions + (offset - 0.5) * 0.38, means, height=0.38, xerr=halves, color=color, label=name, capsize=1.5)
        axis.set_yticks(positions)
        axis.set_yticklabels([row.algorithm for row in group], fontsize=8)
        axis.invert_yaxis()
        axis.set_xlabel(f"final {label(metric)} (mean, 95 % interval over seeds)")
        axis.set_title(f"{task} / {partition}")
        axis.grid(axis="x", alpha=0.3)
        if metric == "perplexity":
            finite = [r.interval(s, metric).mean for r in group for s in ("global", "local") if r.interval(s, metric).n]
            if finite:
                axis.set_xlim(min(finite) * 0.9, max(finite) * 1.05)
        elif metric == "accuracy":
            results = [r for row in group for r in row.results.values() if "majority_class_rate" in r.summary]
            if results:
                axis.axvline(
                    statistics.fmean(r.summary["majority_class_rate"] for r in results), color="tab:blue", linestyle="--", linewidth=1
                )
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=2, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    figure.savefig(path, dpi=100)
    plt.close(figure)
