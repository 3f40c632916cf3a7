"""What a model card reports: held-out perplexity, the unigram baseline, and sample continuations."""

from __future__ import annotations

import math

import numpy as np
import torch

# Prompts for the card's continuations; none comes from the benchmark plays.
SAMPLE_PROMPTS = ("And God said,", "KING HENRY.\nWhat", "Love is", "The ship sailed")


def heldout_windows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> np.ndarray:
    """Non-overlapping windows of ``seq_len + 1`` tokens (consecutive windows share one token)."""
    usable = min(len(tokens), max_tokens + 1)
    count = (usable - 1) // seq_len
    if count < 1:
        raise ValueError(f"the held-out set has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    return np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)]).astype(np.int64)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, windows: np.ndarray, batch_size: int = 16) -> tuple[float, float, int]:
    """(mean next-token cross-entropy in nats, next-token accuracy, predicted tokens) over ``windows``."""
    model.eval()
    total, correct, count = 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[start : start + batch_size])
        logits = model(input_ids=batch[:, :-1]).logits.float()
        targets = batch[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        count += targets.numel()
    return total / count, correct / count, count


def unigram_loss(train_tokens: np.ndarray, windows: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) on the same targets of a unigram model of the training tokens
    (add-one smoothing): the bar a language model must clear to have learned anything from context."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    log_prob = np.log(counts / counts.sum())
    targets = windows[:, 1:].reshape(-1)
    return float(-log_prob[targets].mean())


def perplexity(loss: float) -> float:
    return float(math.exp(min(loss, 50.0)))


@torch.no_grad()
def continuations(model, tokenizer, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 40, seed: int = 0) -> list[dict[str, str]]:
    """A greedy and a sampled (temperature 0.8, top-k 40, seeded) continuation of each prompt."""
    model.eval()
    rows = []
    for index, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
        common = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **common)
        torch.manual_seed(seed * 1000 + index)
        sampled = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.8, top_k=40, **common)
        rows.append(
            {
                "prompt": prompt,
                "greedy": tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True),
                "sampled": tokenizer.decode(sampled[0, ids.shape[1] :], skip_special_tokens=True),
            }
        )
    return rows
