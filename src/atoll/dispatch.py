"""Which driver runs a config: the synchronous loop, the event simulation or Flower.

``start_run`` resolves the config (every check, before anything is loaded or written), then
hands the resolved run to its driver; ``resume_run`` continues a killed synchronous run from its
newest checkpoint. This is the only module that knows every driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atoll.config import Config
from atoll.errors import ConfigError
from atoll.experiment import build
from atoll.report.progress import Progress
from atoll.report.rundir import RunDir
from atoll.resolve import ResolvedRun, resolve
from atoll.fl.federation import Federation
from atoll.report.recorder import Recorder
from atoll.sim.prototype import SynchronousLoop


def start_run(config: Config | ResolvedRun, progress: Progress) -> tuple[RunDir, dict[str, Any]]:
    """Build everything first (user errors surface before any directory exists), then run."""
    run = resolve(config)
    config = run.config
    if config.mode == "realistic":  # the event-driven simulation of devices (atoll.sim.realistic)
        from atoll.sim.realistic import start_realistic_run

        return start_realistic_run(run, progress)
    if config.engine == "flower":  # Flower's simulation or deployment engine (atoll.engines.flower)
        from atoll.engines.flower import start_flower_run

        return start_flower_run(run, progress)
    path = RunDir.choose_path(config)
    RunDir.check_new(path)
    experiment = build(run)
    try:
        run_dir = RunDir.create(path, config, run.to_json())
        progress.message(f"run directory {path}")
        return run_dir, SynchronousLoop(Federation(experiment), Recorder(run_dir, progress)).run()
    finally:
        experiment.close()


def resume_run(path: Path, progress: Progress) -> tuple[RunDir, dict[str, Any]]:
    """Continue a killed run from its newest checkpoint; ends at the uninterrupted run's metrics."""
    run_dir, config = RunDir.open_existing(path)
    if config.mode == "realistic":
        raise ConfigError("realistic-mode runs cannot be resumed", "start the run again: the same config and seed give the same timeline")
    if config.engine == "flower":
        raise ConfigError("Flower runs cannot be resumed: clients' private state lived on their nodes", "start the run again")
    experiment = build(config)
    try:
        federation = Federation(experiment)
        last = federation.restore(run_dir)
        records = run_dir.truncate_metrics(last if last else -1)
        recorder = Recorder(run_dir, progress, records=records)
        if last >= config.federation.rounds:
            progress.message(f"run already finished {last} rounds; rewriting its summary")
            return run_dir, federation.finish(recorder)
        progress.message(f"resuming {path} after round {last}")
        return run_dir, SynchronousLoop(federation, recorder).run(first_round=last + 1)
    finally:
        experiment.close()
