"""`atoll bench sweep`: the peak client learning rate of each algorithm family, chosen on a
validation split that no client trains on and no reported number uses.

For every task, partition, family and learning rate of the task's grid (the suite's, or the task's own), the family's
representative runs once (the sweep's seed, the bench's budget) with ``eval.on: validation``;
the learning rate with the best final validation metric, averaged over the task's partitions,
is the family's on that task. The choice and every score go to the suite's learning-rate file,
which `atoll bench algorithms` reads and docs/algorithms.md reprints.

``extend``: a grid grown past an edge it peaked at is measured only where the learning-rate file
has no score yet (same sweep seed, every partition); the scores it has are kept and chosen from.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

from atoll.errors import ConfigError
from atoll.report.bench.runner import Job, LoadSampler, machine, run_jobs
from atoll.report.bench.suite import Suite, read_learning_rates, write_learning_rates

SWEEP_RECORD = "sweep.json"
# the sweep scores the final round only: no round-0, intermediate or local evaluation
RUN_SETTINGS = (
    "run.threads=1",
    "run.plots=false",
    "run.keep_checkpoints=1",
    "eval.on=validation",
    "eval.local=never",
    "eval.initial=false",
    "eval.every=100000",
)


def lr_text(lr: float) -> str:
    return f"{lr:g}"


def measured(suite: Suite, tasks: list[str]) -> dict[tuple[str, str, float], dict[str, float | None]]:
    """(task, family, lr) -> per-partition scores already in the learning-rate file for this sweep
    seed, where every partition of the task has one."""
    previous = read_learning_rates(suite)
    if previous.get("seed") != suite.sweep.seed:
        return {}
    known = {}
    for task in tasks:
        partitions = set(suite.tasks[task].partitions)
        for family, table in ((previous.get("scores") or {}).get(task) or {}).items():
            if family.startswith("_") or family not in suite.families_of(task):
                continue
            for lr in suite.grid(task):
                row = (table or {}).get(lr_text(lr))
                if isinstance(row, dict) and set(row) == partitions:
                    known[(task, family, lr)] = row
    return known


def sweep_jobs(
    suite: Suite, tasks: list[str], runs: Path, extra: list[str], skip: frozenset = frozenset()
) -> dict[tuple[str, str, str, float], Job]:
    """Every (task, partition, family, learning rate) run of the sweep, less the (task, family, lr) in ``skip``."""
    jobs = {}
    for task in tasks:
        spec = suite.tasks[task]
        for partition, overrides in spec.partitions.items():
            for family in suite.families_of(task):
                representative = suite.families[family].representative
                for lr in suite.grid(task):
                    if (task, family, lr) in skip:
                        continue
                    key = f"sweep/{task}/{partition}/{family}/{lr_text(lr)}"
                    directory = runs / task / partition / f"{representative}-lr{lr_text(lr)}"
                    settings = [
                        *overrides,
                        *spec.overrides.get(representative, []),
                        f"algorithm.name={representative}",
                        f"seed={suite.sweep.seed}",
                        f"name={representative}",
                        f"train.lr={lr}",
                        *RUN_SETTINGS,
                        *extra,
                    ]
                    jobs[(task, partition, family, lr)] = Job(key, directory, str(suite.config_path(task)), tuple(settings))
    return jobs


def run_sweep(
    suite: Suite,
    tasks: list[str],
    runs: Path,
    workers: int,
    extra: list[str],
    command: str,
    log: Callable[[str], None] = print,
    extend: bool = False,
) -> Path:
    """Run (or continue) the sweep, choose each family's learning rate per task, write the file."""
    for task in tasks:
        if task not in suite.tasks:
            raise ConfigError(f"unknown task '{task}'", f"the suite's tasks are: {', '.join(suite.tasks)}")
    if extend and extra:
        raise ConfigError("--extend keeps scores measured without --set overrides", "drop --set, or sweep afresh without --extend")
    known = measured(suite, tasks) if extend else {}
    jobs = sweep_jobs(suite, tasks, runs, extra, frozenset(known))
    record_path = runs / SWEEP_RECORD
    plan = {"tasks": tasks, "grid": {task: suite.grid(task) for task in tasks}, "seed": suite.sweep.seed, "extra": extra}
    if known:
        plan["kept"] = sorted(f"{t}/{f}/{lr_text(lr)}" for t, f, lr in known)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("plan") != plan:
            raise ConfigError(f"'{runs}' holds another sweep", "pass --runs elsewhere, or remove it")
    elif runs.exists() and any(runs.iterdir()):
        raise ConfigError(f"'{runs}' already holds files but no {SWEEP_RECORD}", "pass --runs elsewhere, or remove it")
    else:
        record = {"plan": plan, "sittings": [], "command": command}
    runs.mkdir(parents=True, exist_ok=True)
    started, sampler = time.perf_counter(), LoadSampler()
    record["machine"] = machine()
    sitting = {"runs": sum(not j.finished() for j in jobs.values()), "workers": workers}
    record["sittings"].append(sitting)
    record_path.write_text(json.dumps(record, indent=1))

    def progress(line: str) -> None:  # after every run: a killed sweep keeps its time up to there
        log(line)
        sitting.update(minutes=(time.perf_counter() - started) / 60, load=sampler.summary())
        record_path.write_text(json.dumps(record, indent=1))

    failures = run_jobs(list(jobs.values()), workers, progress)
    sitting.update(minutes=(time.perf_counter() - started) / 60, load=sampler.stop(), failures=failures)
    record_path.write_text(json.dumps(record, indent=1))
    chosen, scores = choose(suite, tasks, jobs, known)
    previous = read_learning_rates(suite)  # tasks this sweep did not run keep their earlier choice
    kept_chosen = {t: v for t, v in (previous.get("chosen") or {}).items() if t not in tasks}
    kept_scores = {t: v for t, v in (previous.get("scores") or {}).items() if t not in tasks}
    for task in tasks:
        cost = {
            "runs": sum(1 for key in jobs if key[0] == task),
            "cpu_minutes": round(sum(_cpu(j) for key, j in jobs.items() if key[0] == task) / 60, 1),
        }
        earlier = ((previous.get("scores") or {}).get(task) or {}).get("_cost") if known else None
        if isinstance(earlier, dict) and any(key[0] == task for key in known):  # the kept scores' runs count too
            cost = {name: round(cost[name] + earlier.get(name, 0), 1) for name in cost}
            cost["runs"] = int(cost["runs"])
        scores[task]["_cost"] = cost
    path = write_learning_rates(suite, {**kept_chosen, **chosen}, {**kept_scores, **scores}, command)
    log(f"sweep: {len(jobs)} runs, {sum(_cpu(j) for j in jobs.values()) / 60:.1f} CPU minutes; wrote {path}")
    return path


def _cpu(job: Job) -> float:
    path = job.directory / "bench-cell.json"
    return json.loads(path.read_text())["cpu_seconds"] if path.is_file() else 0.0


def choose(suite: Suite, tasks: list[str], jobs: dict[tuple[str, str, str, float], Job], known: dict | None = None) -> tuple[dict, dict]:
    """Per task and family, the learning rate whose final validation metric, averaged over the
    task's partitions, is best (a run that failed or diverged to nan scores worst); ``known``
    holds scores kept from an earlier sweep instead of runs."""
    known = known or {}
    from atoll.report.bench.results import CellResult

    chosen: dict = {}
    scores: dict = {}
    for task in tasks:
        spec = suite.tasks[task]
        chosen[task], scores[task] = {}, {}
        for family in suite.families_of(task):
            table: dict[str, dict[str, float | None]] = {}
            for lr in suite.grid(task):
                if (task, family, lr) in known:
                    table[lr_text(lr)] = dict(known[(task, family, lr)])
                    continue
                row = {}
                for partition in spec.partitions:
                    result = CellResult.load(jobs[(task, partition, family, lr)].directory)
                    value = result.final("global", spec.metric) if result else None
                    row[partition] = None if value is None or value != value else round(float(value), 5)
                table[lr_text(lr)] = row
            scores[task][family] = table
            best = max(suite.grid(task), key=lambda lr: _goodness(table[lr_text(lr)], spec.lower_is_better))  # noqa: B023
            if _goodness(table[lr_text(best)], spec.lower_is_better) == float("-inf"):
                raise ConfigError(f"sweep: every learning rate of family '{family}' on '{task}' failed", "see the runs' directories")
            chosen[task][family] = best
    return chosen, scores


def _goodness(scores: dict[str, float | None], lower_is_better: bool) -> float:
    """The mean validation metric over partitions, signed so that larger is better (-inf: a run failed)."""
    values = list(scores.values())
    if not values or any(v is None for v in values):
        return float("-inf")
    mean = statistics.fmean(values)
    return -mean if lower_is_better else mean
