"""The split run's plot: test metric and train loss against steps, and bytes on the wire."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAIN_METRICS = ("accuracy", "exact_match", "f1", "perplexity", "loss")


def plot_run(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.6))
    evaluated = [r for r in records if r.get("eval")]
    metric = next((m for m in MAIN_METRICS if any(m in r["eval"] for r in evaluated)), None)
    if metric is not None:
        points = [(r["step"], r["eval"][metric]) for r in evaluated if metric in r["eval"]]
        left.plot(*zip(*points), "o-")
        left.set_ylabel(f"test {metric}")
    losses = [(r["step"], r["train"]["loss"]) for r in records if "loss" in r.get("train", {})]
    if losses:
        middle.plot(*zip(*losses), "o-", color="tab:red")
    middle.set_ylabel("train loss (mean since last point)")
    traffic = [(r["step"], r["traffic"]["bytes_to_model"] / 1e6, r["traffic"]["bytes_to_data"] / 1e6) for r in records if "traffic" in r]
    if traffic:
        steps, up, down = zip(*traffic)
        right.plot(steps, up, "o-", label="to the model party")
        right.plot(steps, down, "s--", label="to the data parties")
        right.legend(fontsize=8)
    right.set_ylabel("MB on the wire (cumulative)")
    for axis in (left, middle, right):
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=110, bbox_inches="tight")
    temporary.replace(path)
    plt.close(figure)
