"""Run the benchmark's cells: ordinary runs, each in its own run directory, in worker processes
(one torch thread each), resumable at two levels: a finished cell (its summary.json exists) is not
run again, and an unfinished one continues from its newest round checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

CELL_TIMES = "bench-cell.json"  # wall and CPU seconds of the cell's run, written when it ends


@dataclass(frozen=True)
class Job:
    """One run of the benchmark: the key it is reported under, its run directory, its base config
    and the overrides that make it this cell."""

    key: str
    directory: Path
    config: str
    overrides: tuple[str, ...]

    def finished(self) -> bool:
        return (self.directory / "summary.json").is_file()


def _die_with_parent(parent: int) -> None:
    """Linux: a worker is killed when the bench process dies (even by SIGKILL), so a restarted
    bench never shares a run directory with an orphan still writing to it."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: an orphan finishes its current run, then exits
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _quiet_worker(parent: int) -> None:
    _die_with_parent(parent)
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def run_job(job: Job) -> dict[str, float]:
    """Start (or continue, after a kill) the run of ``job``; its wall and CPU seconds."""
    from atoll.config import load_config
    from atoll.dispatch import resume_run, start_run
    from atoll.report.progress import Progress

    started, cpu_started = time.perf_counter(), time.process_time()
    load_start = os.getloadavg()[0]
    resumed = False
    directory = job.directory
    if directory.exists():
        has_checkpoint = (directory / "config.yaml").is_file() and any((directory / "checkpoints").glob("round-*"))
        if has_checkpoint:
            resume_run(directory, Progress())
            resumed = True
        else:
            shutil.rmtree(directory)
    if not resumed:
        directory.parent.mkdir(parents=True, exist_ok=True)
        start_run(load_config(job.config, [*job.overrides, f"run.dir={directory}"]), Progress())
    times = {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "resumed": resumed,
    }
    (directory / CELL_TIMES).write_text(json.dumps(times, indent=1))
    return times


def _run_in_worker(job: Job) -> dict[str, float]:
    return run_job(job)


def run_jobs(jobs: list[Job], workers: int, log: Callable[[str], None] = print) -> dict[str, str]:
    """Run every unfinished job (``workers`` processes, or this process when 1); return the
    failures by key. A failing run is reported, not fatal: the other cells still run."""
    todo = [job for job in jobs if not job.finished()]
    if len(todo) < len(jobs):
        log(f"{len(jobs) - len(todo)} of {len(jobs)} runs already finished; running {len(todo)}")
    failures: dict[str, str] = {}

    def report(done: int, job: Job, times: dict | None, error: BaseException | None) -> None:
        if error is not None:
            failures[job.key] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            log(f"[{done}/{len(todo)}] {job.key}: FAILED {failures[job.key]}")
        else:
            again = ", resumed" if times.get("resumed") else ""
            log(f"[{done}/{len(todo)}] {job.key}: {times['seconds']:.0f} s ({times['cpu_seconds']:.0f} s CPU{again})")

    if workers <= 1:
        for done, job in enumerate(todo, 1):
            try:
                report(done, job, run_job(job), None)
            except Exception as error:  # noqa: BLE001 - reported in the table
                report(done, job, None, error)
        return failures
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_quiet_worker, initargs=(os.getpid(),)
    ) as pool:
        futures = {pool.submit(_run_in_worker, job): job for job in todo}
        for done, future in enumerate(as_completed(futures), 1):
            job = futures[future]
            try:
                report(done, job, future.result(), None)
            except Exception as error:  # noqa: BLE001 - reported in the table
                report(done, job, None, error)
    return failures


def machine() -> dict[str, object]:
    """Versions and machine facts recorded with the table."""
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("atoll", "torch", "transformers", "peft"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    try:
        root = Path(__file__).resolve().parents[4]
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            versions["commit"] = commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": versions, "cpus": os.cpu_count(), "platform": platform.platform()}


class LoadSampler:
    """The machine's 1-minute load average, sampled in a background thread while the bench runs."""

    def __init__(self, every: float = 30.0):
        import threading

        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(every,), daemon=True)
        self._thread.start()

    def _sample(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        samples = [*self.samples, os.getloadavg()[0]]
        return {"min": min(samples), "mean": sum(samples) / len(samples), "max": max(samples)}

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(timeout=5)
        self.samples.append(os.getloadavg()[0])
        return self.summary()
