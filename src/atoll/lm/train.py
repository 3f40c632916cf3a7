"""The pretraining loop: a Llama causal LM trained from scratch on a token stream, on the CPU.

Exact resume and determinism come from one rule: the batch of step ``s`` is a function of
(seed, s) alone (random windows of the token stream drawn from a generator seeded by both), so a
checkpoint needs only the model, the optimizer and the step. At a fixed thread count the
result of a seed is bit-identical, killed and resumed or not.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from atoll.errors import CheckpointError
from atoll.lm.config import PretrainConfig
from atoll.seeding import derive_seed, numpy_rng

CHECKPOINT = "checkpoint.pt"


def build_model(config: PretrainConfig, tokenizer) -> torch.nn.Module:
    """A randomly initialised Llama of the configured size, seeded by the config's seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = config.model
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        max_position_embeddings=arch.max_position,
        tie_word_embeddings=arch.tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(derive_seed(config.seed, "pretrain-init"))
    model = LlamaForCausalLM(model_config)
    return model.float()


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def batch_at(tokens: np.ndarray, step: int, seed: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """The ``batch_size x (seq_len + 1)`` windows of step ``step``: a function of (seed, step) only."""
    starts = numpy_rng(seed, "pretrain-batch", step).integers(0, len(tokens) - seq_len - 1, size=batch_size)
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(windows)


def lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to lr * min_lr_ratio at the last step."""
    train = config.train
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    floor = train.lr * train.min_lr_ratio
    return floor + (train.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": config.train.weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.train.lr, betas=(0.9, 0.95), eps=1e-8)


@dataclass
class TrainState:
    step: int = 0
    wall_seconds: float = 0.0
    losses: list[tuple[int, float]] | None = None  # (step, mean loss over the last interval)


def save_checkpoint(path: Path, model, optimizer, state: TrainState, fingerprint: str) -> None:
    """Written to a temporary file and renamed, so a kill never leaves a half-written checkpoint."""
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": state.step,
            "wall_seconds": state.wall_seconds,
            "losses": state.losses or [],
            "fingerprint": fingerprint,
        },
        temporary,
    )
    os.replace(temporary, path)


def _read_checkpoint(path: Path, fingerprint: str) -> dict:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read '{path}' ({type(exc).__name__})", "delete it to start over") from None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"'{path}' belongs to a different pretraining config", "use another work_dir or delete the old one to start over"
        )
    return saved


def check_resumable(work_dir: Path, fingerprint: str) -> int:
    """The step a run in ``work_dir`` would resume from (0 without a checkpoint); a checkpoint of
    another config is a CheckpointError, raised before anything is written."""
    path = work_dir / CHECKPOINT
    return int(_read_checkpoint(path, fingerprint)["step"]) if path.is_file() else 0


def load_checkpoint(path: Path, model, optimizer, fingerprint: str) -> TrainState:
    saved = _read_checkpoint(path, fingerprint)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return TrainState(saved["step"], saved["wall_seconds"], [tuple(x) for x in saved["losses"]])


Report = Callable[[int, float, float, float], None]  # (step, loss, tokens per second, seconds left)


def train(
    model: torch.nn.Module,
    tokens: np.ndarray,
    config: PretrainConfig,
    work_dir: Path,
    report: Report | None = None,
) -> TrainState:
    """Train to ``config.train.steps``, resuming from ``work_dir/checkpoint.pt`` when present."""
    train_config = config.train
    torch.set_num_threads(train_config.threads)
    fingerprint = config.fingerprint()
    optimizer = make_optimizer(model, config)
    path = work_dir / CHECKPOINT
    state = load_checkpoint(path, model, optimizer, fingerprint) if path.is_file() else TrainState(0, 0.0, [])
    tokens_per_step = train_config.batch_size * train_config.seq_len
    model.train()
    report_every = min(10, train_config.checkpoint_every)
    interval_loss, interval_steps = 0.0, 0
    recent: list[float] = []
    started = time.perf_counter()
    last_time, last_step = started, state.step
    while state.step < train_config.steps:
        step = state.step
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        windows = batch_at(tokens, step, config.seed, train_config.batch_size, train_config.seq_len)
        logits = model(input_ids=windows[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step = step + 1
        value = float(loss.detach())
        interval_loss += value
        interval_steps += 1
        recent = (recent + [value])[-report_every:]
        done = state.step == train_config.steps
        if state.step % train_config.checkpoint_every == 0 or done:
            now = time.perf_counter()
            state.wall_seconds += now - started
            started = now
            state.losses.append((state.step, interval_loss / interval_steps))
            save_checkpoint(path, model, optimizer, state, fingerprint)
            interval_loss, interval_steps = 0.0, 0
        if report is not None and (state.step % report_every == 0 or done):
            now = time.perf_counter()
            rate = (state.step - last_step) * tokens_per_step / max(1e-9, now - last_time)
            left = (train_config.steps - state.step) * tokens_per_step / max(rate, 1e-9)
            report(state.step, sum(recent) / len(recent), rate, left)
            last_time, last_step = now, state.step
    model.eval()
    return state
