"""Adapter swap in and out of the live model on a ~100M-parameter model (random-init Llama):
Workbench.load(state) + Workbench.read(), against a full state-dict clone of the same model.

Target: a swap (load + read) under 10 ms.

    python benchmarks/swap.py [--repeats 50] [--rank 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    import numpy as np
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    from atoll.config import LoRAConfig
    from atoll.data.tasks import TaskSpec, Tokenized
    from atoll.fl.workbench import Workbench

    config = AutoConfig.for_model(
        "llama",
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())

    class Tok:  # the workbench only needs a pad id for this benchmark
        pad_token_id = 0

    empty = Tokenized(np.zeros(1, np.int32), np.zeros(2, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int32))
    bench = Workbench(model, Tok(), TaskSpec("sft"), empty, LoRAConfig(rank=args.rank, alpha=2 * args.rank), ["q_proj", "v_proj"], seed=0)
    gen = torch.Generator().manual_seed(0)
    states = [bench.initial_state().map_tensors(lambda t: t + torch.randn(t.shape, generator=gen)) for _ in range(2)]
    adapter_bytes = states[0].nbytes()

    def timed(fn) -> float:
        started = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - started)

    for state in states:
        bench.load(state), bench.read()
    loads = [timed(lambda i=i: bench.load(states[i % 2])) for i in range(args.repeats)]
    reads = [timed(bench.read) for _ in range(args.repeats)]
    swaps = [timed(lambda i=i: (bench.load(states[i % 2]), bench.read())) for i in range(args.repeats)]
    clones = [timed(lambda: {k: v.clone() for k, v in model.state_dict().items()}) for _ in range(5)]
    print(
        f"model: {parameters / 1e6:.1f}M parameters (Llama, 12 layers, hidden 768); LoRA r={args.rank} on q_proj/v_proj: {adapter_bytes / 1024:.0f} KiB"
    )
    print(f"load  (adapter into the live model): median {statistics.median(loads):.2f} ms")
    print(f"read  (adapter out of the live model): median {statistics.median(reads):.2f} ms")
    print(f"swap  (load + read): median {statistics.median(swaps):.2f} ms, max {max(swaps):.2f} ms  target < 10 ms")
    print(
        f"full state-dict clone of the same model: median {statistics.median(clones):.1f} ms ({statistics.median(clones) / statistics.median(swaps):.0f}x a swap)"
    )


if __name__ == "__main__":
    main()
