"""Realistic-mode scale: prints figures, asserts nothing (the machine is shared; see the targets).

1. The bare event loop (pop + push, no handlers): the ceiling for handler code on this machine,
   measured before each dry run (the two take turns); the ratio of their medians has a target.
2. A system-only dry run (cost model, no data, no model, no training) of 100,000 clients over a
   simulated week (configs/sys/scale-week.yaml: nightly windows, dropout, ranks by device tier):
   wall seconds end to end (config load, run, outputs) and events per second of the event loop.
   Targets: under 60 s, at least 200,000 events/s.
3. Runs with training (tiny-bert: 8 always-on edge devices, sync and fedasync; 500 phones with
   nightly windows and dropout, sync): the share of wall time spent in the event machinery (the
   loop minus the backend calls it makes). Target: under 2 %.

Run: python benchmarks/realistic_scale.py [--clients 100000] [--hours 168] [--skip-training]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def bench_queue(pending: int = 100_000, count: int = 1_000_000) -> tuple[float, float]:
    """The loop with no simulation in it: pop the earliest event, push one later (steady state,
    ``pending`` events waiting, as with one pending window per device). The ceiling any handler
    code sits under on this machine at this moment."""

    from atoll.sim.realistic.events import EventQueue

    queue = EventQueue()
    rng = random.Random(0)
    for client in range(pending):
        queue.push(rng.random() * 7 * 86400, 0, client, 0)
    pop = queue.pop
    done = 0
    started, cpu = time.perf_counter(), time.process_time()
    while done < count:
        when, _, kind, client, token = pop()
        done += 1
        queue.push(when + rng.random() * 86400, kind, client, token)
    return count / (time.perf_counter() - started), count / (time.process_time() - cpu)


def hetero_algorithm() -> str:
    from atoll import algorithms

    specs = algorithms.specs()
    for preferred in ("flexlora", "hetlora", "flora"):
        if preferred in specs:
            return preferred
    return next(name for name, spec in specs.items() if spec.capabilities.mixed_ranks != "refuse")


def bench_dry_run(clients: int, hours: float, root: Path) -> dict:
    from atoll.config import load_config
    from atoll.report.progress import Progress
    from atoll.dispatch import start_run

    started, cpu = time.perf_counter(), time.process_time()
    config = load_config(
        ROOT / "configs" / "quickstart.yaml",
        [
            f"system={ROOT / 'configs' / 'sys' / 'scale-week.yaml'}",
            "mode=realistic",
            "realistic.dry_run=true",
            f"algorithm.name={hetero_algorithm()}",
            f"federation.clients={clients}",
            "federation.sample_rate=0.001",
            "train.local_steps=null",
            "federation.rounds=1000000",
            f"realistic.session_hours={hours}",
            "realistic.sync.wait=deadline",
            "realistic.sync.deadline_seconds=900",
            "realistic.sync.min_clients=50",
            "eval.every=1000000",
            f"run.root={root}",
        ],
    )
    loaded = time.perf_counter()
    _, summary = start_run(config, Progress())
    total = time.perf_counter() - started
    return {
        "config_load_s": loaded - started,
        "total_s": total,
        "total_cpu_s": time.process_time() - cpu,
        "events": summary["events"],
        "events_per_s": summary["events_per_second"],
        "events_per_cpu_s": summary["events_per_cpu_second"],
        "rounds": summary["rounds_completed"],
        "virtual_hours": summary["virtual_hours"],
        "jobs": summary["jobs"],
        "wasted_jobs": summary["wasted"]["jobs"],
        "dropouts": summary["dropouts"],
        "stopped_by": summary["stopped_by"],
    }


def bench_training(root: Path, paradigm: str, nightly: bool = False) -> dict:
    import torch

    from atoll.config import config_with
    from atoll.report.progress import Progress
    from atoll.dispatch import start_run

    torch.set_num_threads(1)
    config = config_with(
        [
            "model.name=tiny-bert",
            "data.source=synthetic-cls",
            "data.max_examples=800",
            "federation.clients=8",
            "federation.rounds=12",
            "train.local_steps=4",
            "train.batch_size=16",
            "eval.every=4",
            "eval.local=never",
            "mode=realistic",
            f"system={ROOT / 'configs' / 'sys' / 'edge-devices.yaml'}",
            f"realistic.paradigm={paradigm}",
            f"run.root={root / paradigm}",
        ]
        + (
            [  # a federation whose event stream is mostly availability: 500 phones, nightly windows, dropout
                f"system={ROOT / 'configs' / 'sys' / 'phones.yaml'}",
                f"algorithm.name={hetero_algorithm()}",
                "federation.clients=500",
                "data.max_examples=3000",
                "partition.name=iid",
                "federation.sample_rate=0.016",
                "federation.rounds=60",
                "train.local_steps=1",
                "eval.every=20",
                "realistic.session_hours=72",
                f"run.root={root / 'nightly'}",
            ]
            if nightly
            else []
        )
    )
    _, summary = start_run(config, Progress())
    return {
        "wall_s": summary["wall_seconds_total"],
        "machinery_s": summary["event_machinery_seconds"],
        "machinery_share_of_run": summary["event_machinery_fraction"],
        "events": summary["events"],
        "rounds": summary["rounds_completed"],
        "virtual_hours": summary["virtual_hours"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--hours", type=float, default=168.0)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="dry runs; this shared VM's speed varies by up to 1.5x between runs")
    args = parser.parse_args()
    print(f"load average before: {load()} (2 cores shared)")
    with tempfile.TemporaryDirectory() as tmp:
        # the bare loop and the dry runs take turns, so a drift of the shared machine's speed
        # touches both sides of the ratio alike
        bare, runs = [], []
        for i in range(args.repeats):
            bare.append(bench_queue())
            runs.append(bench_dry_run(args.clients, args.hours, Path(tmp) / f"dry{i}"))
        for wall_rate, cpu_rate in bare:
            print(
                f"bare event loop (pop + push, no handlers, 100,000 pending): {wall_rate:,.0f} events per wall second ({cpu_rate:,.0f} per CPU second)"
            )
        wall_rate = sorted(rate for rate, _ in bare)[len(bare) // 2]
        for dry in runs:
            print(
                f"dry run, {args.clients:,} clients, {args.hours:g} virtual hours: {dry['total_s']:.1f} s wall, {dry['total_cpu_s']:.1f} s CPU "
                f"(config load {dry['config_load_s']:.1f} s), {dry['events']:,} events at {dry['events_per_s']:,.0f} events per wall second "
                f"({dry['events_per_cpu_s']:,.0f} per CPU second) in the loop; "
                f"{dry['rounds']} rounds over {dry['virtual_hours']:.1f} h (stopped by {dry['stopped_by']}), jobs {dry['jobs']}, "
                f"{dry['wasted_jobs']} lost, {dry['dropouts']} dropouts"
            )
        assert len({(d["events"], d["rounds"]) for d in runs}) == 1, "the same seed must give the same timeline"
        rates = sorted(d["events_per_s"] for d in runs)
        slowest = max(d["total_s"] for d in runs)
        median = rates[len(rates) // 2]
        print(f"  events per second over {len(runs)} identical runs: best {rates[-1]:,.0f}, median {median:,.0f}, worst {rates[0]:,.0f}")
        print(
            f"  the simulation's loop runs at {median / wall_rate:.0%} of the bare loop's rate (medians of {len(runs)} runs each, "
            f"taking turns) -> {'met' if median / wall_rate >= 0.7 else 'MISSED'} (target >= 70 %)"
        )
        print(
            f"  targets: < 60 s -> {'met' if slowest < 60 else 'MISSED'} (slowest run {slowest:.1f} s); "
            f">= 200,000 events/s -> best {'met' if rates[-1] >= 200_000 else 'MISSED'}, median {'met' if median >= 200_000 else 'MISSED'}"
        )
        if not args.skip_training:
            for paradigm, nightly in (("sync", False), ("fedasync", False), ("sync", True)):
                result = bench_training(Path(tmp), paradigm, nightly)
                what = "500 phones with nightly windows and dropout" if nightly else "8 always-on edge devices"
                print(
                    f"with training ({paradigm}, tiny-bert, {what}, {result['rounds']} server updates in {60 * result['virtual_hours']:.1f} virtual minutes, "
                    f"{result['events']:,} events): {result['wall_s']:.1f} s wall, "
                    f"event machinery {result['machinery_s'] * 1000:.1f} ms = {100 * result['machinery_share_of_run']:.3f} % "
                    f"(target < 2 %: {'met' if result['machinery_share_of_run'] < 0.02 else 'MISSED'})"
                )
    print(f"load average after: {load()}")


if __name__ == "__main__":
    main()
