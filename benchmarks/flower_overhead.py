"""Flower's per-round overhead against the local engine on the same work, printed as a ratio.

The same config (same data, model, clients, seeds) runs once with ``engine: local`` and once on
Flower (simulation by default; ``--deployment`` starts a loopback SuperLink and one SuperNode per
client, each a separate process). Per-round wall time comes from each run's metrics.jsonl
(``wall_seconds``: sampling, training, aggregation and server evaluation of one round). Round 1
on Flower includes starting the Ray actors (simulation) or the first ClientApp processes, so the
steady state is the mean over rounds 2..R; round 1 and the fixed start-up cost (SuperLink, Ray,
submission, until the run directory appears) are printed separately. The two runs' task metrics
are checked to be equal (the overhead is measured on identical work).

Wall time on a shared machine is noisy: the load average is printed before and after.

    python benchmarks/flower_overhead.py [--clients 4] [--rounds 4] [--steps 4] [--model tiny-bert] [--deployment]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


def per_round(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["wall_seconds"] for r in records if r["round"] > 0]


def task_metrics(run_dir: Path) -> list[dict]:
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in ("seconds", "wall_seconds", "flower"):
            record.pop(key, None)
        records.append(record)
    return records


def close(a, b, tolerance=1e-6) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(close(a[k], b[k], tolerance) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= tolerance
    return a == b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", default="tiny-bert")
    parser.add_argument("--deployment", action="store_true", help="a loopback SuperLink + SuperNodes instead of the simulation engine")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from atoll.config import config_with
    from atoll.engines.flower.processes import ManagedProcess, flower_env, free_port, wait_healthy
    from atoll.report.progress import Progress
    from atoll.dispatch import start_run

    load_before = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="atoll-flower-bench-"))
    os.environ.setdefault("ATOLL_CACHE", str(scratch / "cache"))
    base = [
        f"model.name={args.model}",
        "data.source=synthetic-cls",
        "data.max_examples=800",
        f"federation.clients={args.clients}",
        f"federation.rounds={args.rounds}",
        f"train.local_steps={args.steps}",
        "train.batch_size=16",
        "eval.every=1",
        "eval.local=never",
        "eval.batch_size=128",
        "run.threads=1",
    ]
    local_dir, _ = start_run(config_with(base + [f"run.dir={scratch / 'local'}"]), Progress())

    processes: list[ManagedProcess] = []
    flower = base + ["engine=flower", f"run.dir={scratch / 'flower'}"]
    try:
        if args.deployment:
            port = free_port()
            atoll = [sys.executable, "-m", "atoll", "flower"]
            processes.append(
                ManagedProcess(
                    atoll + ["superlink", "--insecure", "--port", str(port)], flower_env(scratch / "h-link"), scratch / "superlink.log"
                )
            )
            wait_healthy("127.0.0.1", port, 300, process=processes[0])
            for client in range(args.clients):
                processes.append(
                    ManagedProcess(
                        atoll
                        + [
                            "supernode",
                            "--insecure",
                            "--superlink",
                            f"127.0.0.1:{port}",
                            "--partition-id",
                            str(client),
                            "--num-partitions",
                            str(args.clients),
                            "--port",
                            str(free_port()),
                        ],
                        flower_env(scratch / f"h-node-{client}"),
                        scratch / f"supernode-{client}.log",
                    )
                )
            flower += ["flower.mode=deployment", f"flower.superlink=127.0.0.1:{port}", "flower.insecure=true"]
        started = time.perf_counter()
        flower_dir, _ = start_run(config_with(flower), Progress())
        total = time.perf_counter() - started
    finally:
        for process in reversed(processes):
            process.stop()

    local_rounds, flower_rounds = per_round(local_dir.path), per_round(flower_dir.path)
    same = all(close(a, b) for a, b in zip(task_metrics(local_dir.path), task_metrics(flower_dir.path)))
    steady_local = statistics.mean(local_rounds[1:]) if len(local_rounds) > 1 else local_rounds[0]
    steady_flower = statistics.mean(flower_rounds[1:]) if len(flower_rounds) > 1 else flower_rounds[0]
    fixed = total - sum(flower_rounds)
    engine = "deployment (loopback SuperLink + SuperNodes)" if args.deployment else "simulation (Ray)"
    print(f"Flower {engine} vs local engine: {args.clients} clients x {args.steps} steps, {args.rounds} rounds, {args.model}")
    print(f"  same task metrics in both runs: {'yes' if same else 'NO'}")
    print(f"  local engine per round (rounds 2..R): {steady_local:.3f} s; round 1: {local_rounds[0]:.3f} s")
    print(f"  Flower per round (rounds 2..R):       {steady_flower:.3f} s; round 1: {flower_rounds[0]:.3f} s")
    print(f"  Flower fixed cost (start-up, submission, teardown): {fixed:.1f} s of {total:.1f} s")
    print(f"  per-round overhead: {steady_flower - steady_local:+.3f} s; ratio Flower / local = {steady_flower / steady_local:.2f}")
    print(f"  load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (2 cores shared)")


if __name__ == "__main__":
    main()
