"""`atoll bench algorithms`: every algorithm of a suite (``configs/bench/suite.yaml``) on each of
its tasks and partitions, over several seeds, with the learning rate the sweep chose for its
family; then docs/algorithms.md (means with 95 % intervals, paired differences against FedIT,
test-set standard errors, rounds and megabytes to a target, time per round) and its plots.

Each run is an ordinary run directory under ``--runs``; ``bench.json`` there records the plan,
the command, versions, the machine's load and every sitting's time. Running the same command
again continues a killed bench where it stopped (:mod:`atoll.report.bench.runner`).
"""

from __future__ import annotations

import datetime
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from atoll.errors import ConfigError
from atoll.report.bench.runner import Job, LoadSampler, machine, run_jobs
from atoll.report.bench.suite import Suite, learning_rate, read_learning_rates

BENCH_RECORD = "bench.json"
RUN_SETTINGS = ("run.threads=1", "run.plots=false", "run.keep_checkpoints=1")


@dataclass(frozen=True)
class Cell:
    task: str
    partition: str
    algorithm: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.partition}/{self.algorithm}/{self.seed}"

    def directory(self, runs: Path) -> Path:
        return runs / self.task / self.partition / f"{self.algorithm}-seed{self.seed}"


def plan(suite: Suite, tasks: list[str], partitions: list[str] | None, algorithms: list[str] | None, seeds: int) -> dict:
    """What a bench runs: per task its partitions and algorithms, the seeds, and each family's
    learning rate (the sweep's choice). Checks every name against the suite."""
    chosen_lrs = read_learning_rates(suite)
    result: dict = {"seeds": list(range(seeds)), "tasks": {}, "sweep": chosen_lrs}
    for task in tasks:
        if task not in suite.tasks:
            raise ConfigError(f"unknown task '{task}'", f"the suite's tasks are: {', '.join(suite.tasks)}")
        spec = suite.tasks[task]
        names = [p for p in spec.partitions if partitions is None or p in partitions]
        if partitions is not None and not names:
            raise ConfigError(
                f"task '{task}' has none of the partitions {', '.join(partitions)}", f"its partitions: {', '.join(spec.partitions)}"
            )
        everything = suite.algorithms(task)
        chosen = [a for a in everything if algorithms is None or a in algorithms]
        if algorithms is not None:
            unknown = [a for a in algorithms if a not in everything and not any(a in suite.algorithms(t) for t in tasks)]
            if unknown:
                raise ConfigError(f"'{unknown[0]}' is not an algorithm of the suite's tasks", f"task '{task}' has: {', '.join(everything)}")
        result["tasks"][task] = {
            "config": str(suite.config_path(task)),
            "partitions": {p: spec.partitions[p] for p in names},
            "algorithms": chosen,
            "learning_rates": {a: learning_rate(suite, chosen_lrs, task, a) for a in chosen},
            "spec": spec.model_dump(),
        }
    return result


def cells(record: dict, algorithms: list[str] | None = None) -> list[Cell]:
    return [
        Cell(task, partition, algorithm, seed)
        for task, spec in record["tasks"].items()
        for partition in spec["partitions"]
        for algorithm in spec["algorithms"]
        if algorithms is None or algorithm in algorithms
        for seed in record["seeds"]
    ]


def job(record: dict, cell: Cell, runs: Path) -> Job:
    spec = record["tasks"][cell.task]
    overrides = [
        *spec["partitions"][cell.partition],
        *spec["spec"].get("overrides", {}).get(cell.algorithm, []),
        f"algorithm.name={cell.algorithm}",
        f"seed={cell.seed}",
        f"name={cell.algorithm}",
        f"train.lr={spec['learning_rates'][cell.algorithm]}",
        *RUN_SETTINGS,
        *record["extra"],
    ]
    return Job(cell.key, cell.directory(runs), spec["config"], tuple(overrides))


def _same_plan(old: dict, new: dict) -> bool:
    keys = ("seeds", "extra")

    def tasks(r: dict) -> dict:  # what a task's runs are made of (its title, metric and target only render)
        return {
            t: {**{k: v for k, v in s.items() if k != "spec"}, "overrides": s["spec"].get("overrides", {})} for t, s in r["tasks"].items()
        }

    return all(old.get(k) == new.get(k) for k in keys) and tasks(old) == tasks(new)


def run_comparison(
    suite: Suite,
    record: dict,
    runs: Path,
    out: Path,
    workers: int,
    command: str,
    log: Callable[[str], None] = print,
) -> Path:
    """Run (or continue) the bench ``record`` plans in ``runs``, then render it into ``out``."""
    path = runs / BENCH_RECORD
    record = {**record, "extra": list(record.get("extra", []))}
    if path.is_file():
        old = json.loads(path.read_text())
        if not _same_plan(old, record):
            raise ConfigError(
                f"'{runs}' holds another bench (other tasks, algorithms, seeds, learning rates or --set)",
                "pass --runs elsewhere, or remove it",
            )
        log(f"continuing the bench in {runs}")
        record = {**old, "tasks": record["tasks"]}
    elif runs.exists() and any(runs.iterdir()):
        raise ConfigError(f"'{runs}' already holds files but no {BENCH_RECORD}", "pass --runs elsewhere, or remove it")
    else:
        record.update({"suite": str(suite.path), "sittings": [], "failures": {}, "notes": [], "command": command})
    runs.mkdir(parents=True, exist_ok=True)
    record["machine"] = machine()
    record["workers"] = workers
    jobs = [job(record, cell, runs) for cell in cells(record)]
    _sitting(record, jobs, workers, path, log)
    return render(runs, out)


def _sitting(record: dict, jobs: list[Job], workers: int, path: Path, log) -> None:
    """Run the unfinished ``jobs``, recording this sitting's wall time, CPU time and load."""
    started, sampler = time.perf_counter(), LoadSampler()
    todo = [j for j in jobs if not j.finished()]
    sitting = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "runs": len(todo), "workers": workers}
    record["sittings"].append(sitting)
    path.write_text(json.dumps(record, indent=1))  # a killed sitting is still on record

    def progress(line: str) -> None:  # after every run: a killed sitting keeps its time up to there
        log(line)
        sitting.update(minutes=(time.perf_counter() - started) / 60, load=sampler.summary())
        path.write_text(json.dumps(record, indent=1))

    failures = run_jobs(jobs, workers, progress)
    sitting["minutes"] = (time.perf_counter() - started) / 60
    sitting["load"] = sampler.stop()
    for j in jobs:
        record["failures"].pop(j.key, None)
    record["failures"].update(failures)
    path.write_text(json.dumps(record, indent=1))


def rerun_algorithms(algorithms: list[str], why: str, runs: Path, out: Path, workers: int | None = None, log=print) -> Path:
    """Re-run every cell of ``algorithms`` in a finished bench (same tasks, partitions, seeds,
    learning rates and overrides), replacing their run directories, and note under the table
    what was re-run, how long it took and why."""
    path = runs / BENCH_RECORD
    record = json.loads(path.read_text())
    chosen = cells(record, algorithms)
    for cell in chosen:
        shutil.rmtree(cell.directory(runs), ignore_errors=True)
    started = time.perf_counter()
    _sitting(record, [job(record, cell, runs) for cell in chosen], workers or record["workers"], path, log)
    minutes = (time.perf_counter() - started) / 60
    record["notes"].append(
        f"{datetime.date.today().isoformat()}: the {', '.join(algorithms)} rows were re-run ({len(chosen)} runs, {minutes:.1f} minutes, "
        f"`atoll bench algorithms --rerun {','.join(algorithms)}`): {why}"
    )
    path.write_text(json.dumps(record, indent=1))
    return render(runs, out)


def render(runs: Path, out: Path) -> Path:
    """algorithms.md, its plots and algorithms.json from the run directories of a bench
    (``--render-only`` re-renders without running anything)."""
    from atoll.report.bench import figures, tables
    from atoll.report.bench.results import CellResult, Row

    record = json.loads((runs / BENCH_RECORD).read_text())
    rows: dict[tuple[str, str], list[Row]] = {}
    for task, spec in record["tasks"].items():
        for partition in spec["partitions"]:
            rows[(task, partition)] = []
            for algorithm in spec["algorithms"]:
                row = Row(algorithm, {})
                for seed in record["seeds"]:
                    cell = Cell(task, partition, algorithm, seed)
                    loaded = CellResult.load(cell.directory(runs))
                    if loaded is not None and cell.key not in record["failures"]:
                        row.results[seed] = loaded
                    else:
                        row.failures[seed] = record["failures"].get(cell.key, "no finished run directory")
                rows[(task, partition)].append(row)
    out.mkdir(parents=True, exist_ok=True)
    document = tables.document(record, rows, figures.names(record))
    (out / "algorithms.md").write_text(document)
    figures.draw(record, rows, out)
    (out / "algorithms.json").write_text(json.dumps(tables.as_json(record, rows), indent=1, sort_keys=True))
    return out / "algorithms.md"


def command_line() -> str:
    """How this process was started, as a shell command (recorded with the table)."""
    arguments = sys.argv[1:]
    return "atoll " + shlex.join(arguments) if arguments else "atoll"
