"""Training throughput of a random-init Llama (AdamW, full model) at one size: what `atoll pretrain`
can afford on this machine. Prints parameters, seconds per step and tokens per second.

    python benchmarks/pretrain_speed.py THREADS VOCAB HIDDEN LAYERS INTERMEDIATE HEADS KV_HEADS SEQ_LEN BATCH
    python benchmarks/pretrain_speed.py 1 4096 256 4 688 8 4 128 16      # atoll-edge's size
    python benchmarks/pretrain_speed.py 1 8192 384 6 1024 6 2 128 16     # atoll-cloud's size
"""

from __future__ import annotations

import sys
import time

import torch


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]))
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden, layers, intermediate, heads, kv_heads, seq_len, batch = (int(x) for x in sys.argv[2:10])
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1))
    for step in range(13):  # 3 warm-up steps, 10 timed
        if step == 3:
            started = time.perf_counter()
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    seconds = (time.perf_counter() - started) / 10
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{parameters / 1e6:.2f}M parameters: {seconds:.3f} s/step, {batch * seq_len / seconds:,.0f} tokens/s")


if __name__ == "__main__":
    main()
