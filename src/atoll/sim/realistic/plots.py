"""PNG plots of a realistic run: metric vs virtual time, a per-client Gantt timeline, device
utilization and a staleness histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from atoll.report.plots import _pyplot, _save

PHASE_COLORS = {"online": "#e3e3e3", "download": "tab:blue", "train": "tab:green", "upload": "tab:orange"}


def plot_metric_vs_time(records: list[dict[str, Any]], metric: str | None, path: Path, title: str) -> None:
    """The global (and local) metric against virtual hours; server updates per hour on the right."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    drawn = False
    if metric:
        for scope, style in (("global", "o-"), ("local", "s--")):
            points = [(r["virtual_hours"], r[scope][metric]) for r in records if metric in (r.get(scope) or {}) and "virtual_hours" in r]
            if points:
                xs, ys = zip(*points)
                left.plot(xs, ys, style, label=f"{scope} {metric}")
                drawn = True
    if drawn:
        left.set_ylabel(metric)
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no metric (dry run)", ha="center", va="center", transform=left.transAxes)
    left.set_xlabel("virtual time (hours)")
    left.grid(alpha=0.3)
    rounds = [(r["virtual_hours"], r["round"]) for r in records if "virtual_hours" in r and not r.get("final_evaluation")]
    if rounds:
        xs, ys = zip(*rounds)
        right.step(xs, ys, where="post", color="tab:purple")
    right.set_xlabel("virtual time (hours)")
    right.set_ylabel("server updates (rounds / versions)")
    right.grid(alpha=0.3)
    figure.suptitle(title)
    _save(figure, path)
    plt.close(figure)


def plot_timeline(
    segments: list[tuple[int, str, float, float, str]],
    path: Path,
    title: str,
    dropouts: list[tuple[int, float]] | None = None,
    end_seconds: float | None = None,
) -> None:
    """A Gantt chart: one row per recorded client; grey online windows, coloured download / train /
    upload phases (at least 1/600 of the axis wide, so second-long jobs stay visible over days),
    hatched red where work was lost (outcome != ok)."""
    plt = _pyplot()
    clients = sorted({s[0] for s in segments})
    rows = {client: row for row, client in enumerate(clients)}
    figure, axis = plt.subplots(figsize=(11, max(2.5, 0.28 * len(clients) + 1.2)))
    span = (end_seconds or max((s[3] for s in segments), default=1.0)) / 3600.0
    for client, phase, start, end, outcome in segments:
        y = rows[client]
        width = max(end - start, 0.0) / 3600.0
        if phase != "online":
            width = max(width, span / 600.0)
        if phase == "online":
            axis.barh(y, width, left=start / 3600.0, height=0.8, color=PHASE_COLORS["online"], edgecolor="none", zorder=1)
            continue
        lost = outcome not in ("ok", "in_flight")
        axis.barh(
            y,
            width,
            left=start / 3600.0,
            height=0.5,
            color=PHASE_COLORS.get(phase, "grey"),
            edgecolor="red" if lost else "none",
            hatch="///" if lost else None,
            alpha=0.55 if lost else 1.0,
            zorder=2,
        )
    for client, when in dropouts or []:
        if client in rows:
            axis.plot(when / 3600.0, rows[client], "kx", markersize=5, zorder=3)
    axis.set_yticks(range(len(clients)))
    axis.set_yticklabels([str(c) if c >= 0 else "pooled" for c in clients], fontsize=7)
    axis.set_xlim(0.0, span * 1.01)
    axis.set_xlabel("virtual time (hours)")
    axis.set_ylabel("client")
    axis.invert_yaxis()
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=p) for p, c in PHASE_COLORS.items()] + [
        Patch(facecolor="white", edgecolor="red", hatch="///", label="lost")
    ]
    axis.legend(handles=handles, fontsize=7, loc="upper right", ncol=5)
    axis.set_title(title)
    _save(figure, path)
    plt.close(figure)


def plot_utilization(devices: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """Per device profile: share of online time spent training (useful and wasted) and transferring."""
    plt = _pyplot()
    names = sorted(devices)
    figure, axis = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 3.6))
    x = np.arange(len(names))
    useful = np.array([devices[n]["train_share"] - devices[n]["wasted_share"] for n in names])
    wasted = np.array([devices[n]["wasted_share"] for n in names])
    transfer = np.array([devices[n]["transfer_share"] for n in names])
    axis.bar(x, useful, color="tab:green", label="training (kept)")
    axis.bar(x, wasted, bottom=useful, color="tab:red", label="training (lost)")
    axis.bar(x, transfer, bottom=useful + wasted, color="tab:blue", label="transfers")
    axis.set_xticks(x)
    axis.set_xticklabels([f"{n}\n({int(devices[n]['clients'])})" for n in names], fontsize=8)
    axis.set_ylabel("share of online time")
    axis.set_ylim(0, max(1e-3, float((useful + wasted + transfer).max()) * 1.15))
    axis.legend(fontsize=8)
    axis.set_title(title)
    axis.grid(alpha=0.3, axis="y")
    _save(figure, path)
    plt.close(figure)


def plot_staleness(histogram: dict[int, int], path: Path, title: str) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.4))
    if histogram:
        keys = sorted(histogram)
        axis.bar(keys, [histogram[k] for k in keys], color="tab:purple", width=0.8)
    else:
        axis.text(0.5, 0.5, "no aggregated updates", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("staleness (server updates since download)")
    axis.set_ylabel("aggregated updates")
    axis.set_title(title)
    axis.grid(alpha=0.3, axis="y")
    _save(figure, path)
    plt.close(figure)
