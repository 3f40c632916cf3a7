"""`atoll bench algorithms`: every algorithm on one task, under several partitions and seeds, as a
markdown table (final global and personalized metric mean ± std, rounds to a target, MB moved per
round) and a plot. Runs go to worker processes (one torch thread each); each run is an ordinary
run directory, so any cell of the table can be inspected or re-run."""

from __future__ import annotations

import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

# The comparison's default small settings: the quickstart task (pretrained MiniLM, tweet sentiment,
# 10 clients), shortened so 2 partitions x 3 seeds x every algorithm fit in an hour on 2 cores.
BENCH_DEFAULTS = [
    "model.max_length=32",
    "data.max_examples=2000",
    "data.test_size=200",
    "data.local_test_fraction=0.15",
    "federation.clients=10",
    "federation.rounds=4",
    "federation.sample_rate=1.0",
    "train.local_steps=3",
    "train.batch_size=12",
    "train.lr=0.006",
    "eval.every=2",
    "eval.initial=false",
    "eval.local=final",
    "run.threads=1",
    "run.plots=false",
]

PARTITIONS = {
    "iid": ["partition.name=iid"],
    "dirichlet-0.1": ["partition.name=dirichlet", "partition.alpha=0.1", "partition.min_examples=10"],
}


@dataclass(frozen=True)
class Cell:
    algorithm: str
    partition: str
    seed: int


def _run_one(config_path: str | None, overrides: list[str], run_dir: str) -> dict[str, Any]:
    """Worker: one ordinary run; returns its summary plus the per-round global metric."""
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    from atoll.config import load_config
    from atoll.report.progress import Progress
    from atoll.dispatch import start_run

    config = load_config(config_path, overrides + [f"run.dir={run_dir}"])
    started = time.perf_counter()
    run, summary = start_run(config, Progress())
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    metric = summary["metric"]
    summary["curve"] = [(r["round"], r["global"][metric]) for r in records if metric in (r.get("global") or {})]
    summary["seconds"] = time.perf_counter() - started
    return summary


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _rounds_to(curve: list[tuple[int, float]], target: float, lower_is_better: bool) -> int | None:
    for round, value in curve:
        if round > 0 and (value <= target if lower_is_better else value >= target):
            return round
    return None


def _run_cells(
    cells: list[Cell], runs_dir: Path, workers: int, config_path: str | None, extra: list[str], log
) -> tuple[dict[str, float], dict[str, str]]:
    """Run ``cells`` in worker processes; (seconds, failures) by cell key."""
    seconds: dict[str, float] = {}
    failures: dict[str, str] = {}
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {}
        for cell in cells:
            overrides = (
                BENCH_DEFAULTS
                + PARTITIONS[cell.partition]
                + [f"algorithm.name={cell.algorithm}", f"seed={cell.seed}", f"name={cell.algorithm}"]
                + extra
            )
            futures[pool.submit(_run_one, config_path, overrides, str(_cell_dir(runs_dir, cell)))] = cell
        for done, future in enumerate(as_completed(futures), 1):
            cell = futures[future]
            try:
                result = future.result()
                seconds[_key(cell)] = result["seconds"]
                final = result["final_global"].get(result["metric"], float("nan"))
                log(f"[{done}/{len(cells)}] {cell.partition} {cell.algorithm} seed {cell.seed}: {final:.4f} ({result['seconds']:.0f} s)")
            except Exception as exc:  # a failing algorithm is reported in the table, not fatal
                failures[_key(cell)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                log(f"[{done}/{len(cells)}] {cell.partition} {cell.algorithm} seed {cell.seed}: FAILED {failures[_key(cell)]}")
    return seconds, failures


def run_comparison(
    algorithms: list[str],
    partitions: list[str],
    seeds: list[int],
    out_dir: Path,
    runs_dir: Path,
    workers: int,
    target: float,
    config_path: str | None,
    extra: list[str],
    log=print,
) -> Path:
    """Run every cell in worker processes, record the bench in ``runs_dir/bench.json``, then
    render the table and plot from the run directories (:func:`render`)."""
    cells = [Cell(a, p, s) for p in partitions for a in algorithms for s in seeds]
    started = time.perf_counter()
    seconds, failures = _run_cells(cells, runs_dir, workers, config_path, extra, log)
    record = {
        "algorithms": algorithms,
        "partitions": partitions,
        "seeds": seeds,
        "workers": workers,
        "target": target,
        "extra": extra,
        "config": config_path,
        "minutes": (time.perf_counter() - started) / 60,
        "seconds": seconds,
        "failures": failures,
        "notes": [],
    }
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / BENCH_RECORD).write_text(json.dumps(record, indent=1))
    return render(runs_dir, out_dir)


def rerun_algorithms(algorithms: list[str], why: str, runs_dir: Path, out_dir: Path, log=print) -> Path:
    """Re-run every cell of ``algorithms`` in a finished bench (same partitions, seeds, config and
    overrides), replace their run directories, and record a dated note in the table saying what
    was re-run, how long it took and why."""
    import datetime
    import shutil

    record = json.loads((runs_dir / BENCH_RECORD).read_text())
    cells = [Cell(a, p, s) for p in record["partitions"] for a in algorithms for s in record["seeds"]]
    for cell in cells:
        if _cell_dir(runs_dir, cell).exists():
            shutil.rmtree(_cell_dir(runs_dir, cell))
    started = time.perf_counter()
    seconds, failures = _run_cells(cells, runs_dir, record["workers"], record.get("config"), record["extra"], log)
    minutes = (time.perf_counter() - started) / 60
    for cell in cells:
        record["failures"].pop(_key(cell), None)
        record["seconds"].pop(_key(cell), None)
    record["seconds"].update(seconds)
    record["failures"].update(failures)
    names = ", ".join(algorithms)
    record.setdefault("notes", []).append(
        f"{datetime.date.today().isoformat()}: the {names} rows were re-run ({len(cells)} runs, {minutes:.1f} minutes, "
        f"`atoll bench algorithms --rerun {','.join(algorithms)}`): {why}"
    )
    (runs_dir / BENCH_RECORD).write_text(json.dumps(record, indent=1))
    return render(runs_dir, out_dir)


BENCH_RECORD = "bench.json"


def _key(cell: Cell) -> str:
    return f"{cell.partition}/{cell.algorithm}/{cell.seed}"


def _cell_dir(runs_dir: Path, cell: Cell) -> Path:
    return runs_dir / cell.partition / f"{cell.algorithm}-seed{cell.seed}"


def _load_cell(runs_dir: Path, cell: Cell) -> dict[str, Any] | None:
    """A finished run's summary plus its per-round global metric curve (None if it did not finish)."""
    path = _cell_dir(runs_dir, cell)
    if not (path / "summary.json").is_file():
        return None
    summary = json.loads((path / "summary.json").read_text())
    metric = summary["metric"]
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary["curve"] = [(r["round"], r["global"][metric]) for r in records if metric in (r.get("global") or {})]
    return summary


_LOCAL_MAJORITY: dict[tuple[str, int], float | None] = {}


def _local_majority(runs_dir: Path, cell: Cell) -> float | None:
    """The local majority-class rate of a run's splits, from its saved config (the splits depend
    on the data, partition and seed only, so it is computed once per partition and seed)."""
    key = (cell.partition, cell.seed)
    if key not in _LOCAL_MAJORITY:
        from atoll.config import load_config
        from atoll.experiment import load_data, majority_rates

        _, spec, _, data, splits = load_data(load_config(_cell_dir(runs_dir, cell) / "config.yaml"))
        _LOCAL_MAJORITY[key] = majority_rates(spec, data, splits)[1]
    return _LOCAL_MAJORITY[key]


def render(runs_dir: Path, out_dir: Path) -> Path:
    """algorithms.md, .png and .json from the run directories of a bench (``atoll bench
    algorithms --render-only`` re-renders without re-running)."""
    record = json.loads((runs_dir / BENCH_RECORD).read_text())
    algorithms, partitions, seeds, target = record["algorithms"], record["partitions"], record["seeds"], record["target"]
    results: dict[Cell, dict[str, Any]] = {}
    failures: dict[Cell, str] = {}
    for cell in (Cell(a, p, s) for p in partitions for a in algorithms for s in seeds):
        loaded = _load_cell(runs_dir, cell)
        if loaded is not None and _key(cell) not in record["failures"]:
            loaded["seconds"] = record["seconds"].get(_key(cell))
            results[cell] = loaded
        else:
            failures[cell] = record["failures"].get(_key(cell), "no finished run directory")
    for cell, result in results.items():
        if "local_majority_rate" not in result and "majority_class_rate" in result:
            result["local_majority_rate"] = _local_majority(runs_dir, cell)  # runs made before summaries had it
    out_dir.mkdir(parents=True, exist_ok=True)
    table = _table(algorithms, partitions, seeds, results, failures, target)
    metric = next(iter(results.values()))["metric"] if results else "accuracy"
    header = [
        "# Algorithm comparison",
        "",
        f"Every registered algorithm on the quickstart task (pretrained MiniLM + LoRA r=8, 3-class tweet sentiment, "
        f"{_setting(BENCH_DEFAULTS + record['extra'])}), under {', '.join(partitions)}, seeds {', '.join(map(str, seeds))}.",
        f"Global = the server's model on the held-out global test set (for algorithms without a global model: the mean of the clients' own models on it). "
        f"Personalized = the mean over clients of the model each client would use, on its own local test split. "
        f"Rounds to {target:.2f} = first round whose global {metric} reaches {target:.2f} (mean over the seeds that reach it; in brackets how many did). "
        f"MB per round = bytes actually sent, per round, summed over clients. "
        f"The first row of each table is the reference a constant predictor scores: the majority class of the global test set "
        f"(global column) and of each client's local test split (personalized column).",
        "",
        f"Made by `{_command(algorithms, partitions, seeds, record['workers'], target)}` in {record['minutes']:.1f} minutes on this 2-core machine.",
        *(f"\n{note}" for note in record.get("notes", [])),  # cells re-run later, and why
        "",
    ]
    (out_dir / "algorithms.md").write_text("\n".join(header) + table + "\n")
    _plot(algorithms, partitions, results, metric, out_dir / "algorithms.png")
    keep = (
        "final_global",
        "final_local",
        "bytes_up_total",
        "bytes_down_total",
        "curve",
        "seconds",
        "majority_class_rate",
        "local_majority_rate",
    )
    (out_dir / "algorithms.json").write_text(
        json.dumps(
            {_key(c): {k: v for k, v in r.items() if k in keep} for c, r in results.items()}
            | {_key(c): {"failed": f} for c, f in failures.items()},
            indent=1,
            sort_keys=True,
        )
    )
    return out_dir / "algorithms.md"


def _setting(overrides: list[str]) -> str:
    values = dict(o.split("=", 1) for o in overrides)
    return (
        f"{values['federation.clients']} clients, {values['federation.rounds']} rounds, {values['train.local_steps']} local steps, "
        f"batch {values['train.batch_size']}, lr {values['train.lr']}, {values['data.max_examples']} tweets, global test {values['data.test_size']}, evaluated every {values['eval.every']} rounds"
    )


def _command(algorithms, partitions, seeds, workers, target) -> str:
    return f"atoll bench algorithms --seeds {len(seeds)} --workers {workers} --target {target}"


def _table(algorithms, partitions, seeds, results, failures, target) -> str:
    lines = []
    for partition in partitions:
        lines += [
            f"## {partition}",
            "",
            f"| algorithm | global | personalized | rounds to {target:.2f} | MB up / round | MB down / round |",
            "|---|---|---|---|---|---|",
        ]
        # the reference: one result per seed (every algorithm of a seed shares the data and splits)
        by_seed = {c.seed: r for c, r in results.items() if c.partition == partition and "majority_class_rate" in r}
        if by_seed:
            global_rates = [r["majority_class_rate"] for r in by_seed.values()]
            local_rates = [r["local_majority_rate"] for r in by_seed.values() if r.get("local_majority_rate") is not None]
            lines.append(f"| *majority class (constant predictor)* | {_mean_std(global_rates)} | {_mean_std(local_rates)} | | | |")
        for algorithm in algorithms:
            cells = [Cell(algorithm, partition, s) for s in seeds]
            done = [results[c] for c in cells if c in results]
            failed = [failures[c] for c in cells if c in failures]
            if not done:
                lines.append(f"| {algorithm} | failed: {failed[0] if failed else 'not run'} | | | | |")
                continue
            metric = done[0]["metric"]
            lower = metric == "loss"
            global_values = [r["final_global"][metric] for r in done if metric in r["final_global"]]
            local_values = [r["final_local"][metric] for r in done if metric in r["final_local"]]
            reached = [x for x in (_rounds_to(r["curve"], target, lower) for r in done) if x is not None]
            rounds_text = f"{statistics.mean(reached):.1f} ({len(reached)}/{len(done)})" if reached else f"— (0/{len(done)})"
            up = statistics.mean(r["bytes_up_total"] / r["rounds"] / 1e6 for r in done)
            down = statistics.mean(r["bytes_down_total"] / r["rounds"] / 1e6 for r in done)
            note = f" ({len(failed)} failed)" if failed else ""
            lines.append(
                f"| {algorithm}{note} | {_mean_std(global_values)} | {_mean_std(local_values)} | {rounds_text} | {up:.2f} | {down:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _plot(algorithms, partitions, results, metric, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(partitions), figsize=(7 * len(partitions), 0.32 * len(algorithms) + 1.8), sharey=True, squeeze=False)
    positions = np.arange(len(algorithms))
    for axis, partition in zip(axes[0], partitions):
        for offset, (scope, color) in enumerate((("final_global", "tab:blue"), ("final_local", "tab:orange"))):
            means, stds = [], []
            for algorithm in algorithms:
                values = [
                    r[scope][metric]
                    for c, r in results.items()
                    if c.algorithm == algorithm and c.partition == partition and metric in r[scope]
                ]
                means.append(statistics.mean(values) if values else math.nan)
                stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            axis.barh(
                positions + (offset - 0.5) * 0.38,
                means,
                height=0.38,
                xerr=stds,
                color=color,
                label="global" if offset == 0 else "personalized",
            )
        by_seed = {c.seed: r for c, r in results.items() if c.partition == partition and "majority_class_rate" in r}
        for key, color, label in (
            ("majority_class_rate", "tab:blue", "majority class, global test"),
            ("local_majority_rate", "tab:orange", "own majority class, local tests"),
        ):
            rates = [r[key] for r in by_seed.values() if r.get(key) is not None]
            if rates:
                axis.axvline(statistics.mean(rates), color=color, linestyle="--", linewidth=1, label=label)
        axis.set_yticks(positions)
        axis.set_yticklabels(algorithms, fontsize=8)
        axis.set_xlabel(f"final {metric}")
        axis.set_title(partition)
        axis.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()  # once: the axes share y, and a second inversion would undo it
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(path, dpi=110)
    plt.close(figure)
