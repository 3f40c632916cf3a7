"""CPU cost of one cell of `atoll bench algorithms`, by phase, to size the benchmark's budget
(configs/bench/SIZING.md): start-up, local training, aggregation and evaluation, in CPU seconds
of this process (``time.process_time``), so the figures mean something on a shared machine.

The cell runs through the bench's own runner with the given base config and overrides; the
round-0 evaluation is outside ``Federation.evaluate`` and shows up in the remainder.

    nice -n 15 python benchmarks/bench_cell_cost.py configs/bench/tweets.yaml DIR federation.rounds=2 eval.every=1
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from atoll.fl.federation import Federation
from atoll.report.bench.runner import Job, run_job

SECONDS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def timed(name: str, function):
    """``function`` with its CPU seconds added to SECONDS[name]."""

    def wrapper(*args, **kwargs):
        started = time.process_time()
        try:
            return function(*args, **kwargs)
        finally:
            SECONDS[name] += time.process_time() - started
            CALLS[name] += 1

    return wrapper


def main() -> None:
    torch.set_num_threads(1)
    config, directory, *overrides = sys.argv[1:]
    Federation.train = timed("train", Federation.train)
    Federation.aggregate = timed("aggregate", Federation.aggregate)
    Federation.evaluate = timed("evaluate", Federation.evaluate)
    started = time.process_time()
    times = run_job(Job("cost", Path(directory), config, (*overrides, "run.plots=false", "run.threads=1")))
    print(json.dumps({"process_cpu": time.process_time() - started, "by_phase": SECONDS, "calls": CALLS, **times}, indent=1))


if __name__ == "__main__":
    main()
