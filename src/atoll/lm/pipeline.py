"""``atoll pretrain``: corpus -> byte-level BPE -> token stream -> Llama -> evaluation -> model directory.

Every stage is deterministic for a seed, and the slow ones keep their output in the work
directory, so running the same command again after a kill continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from atoll.lm import card
from atoll.lm.config import PretrainConfig
from atoll.lm.corpus import Corpus, build_corpus
from atoll.lm.evaluate import continuations, heldout_loss, heldout_windows, perplexity, unigram_loss
from atoll.lm.train import Report, build_model, check_resumable, parameter_count, train


@dataclass
class PretrainResult:
    out_dir: Path
    numbers: dict = field(default_factory=dict)


def _limit(corpus: Corpus, max_characters: int | None) -> Corpus:
    """The first chunks up to ``max_characters`` of training text (and a tenth of that held out)."""
    if max_characters is None:
        return corpus

    def take(chunks: list[str], budget: int) -> list[str]:
        kept, used = [], 0
        for chunk in chunks:
            if used >= budget:
                break
            kept.append(chunk)
            used += len(chunk)
        return kept

    train, heldout = take(corpus.train, max_characters), take(corpus.heldout, max(1, max_characters // 10))
    manifest = dict(corpus.manifest, train_chunks=len(train), heldout_chunks=len(heldout), max_characters=max_characters)
    manifest["train_characters"] = sum(len(c) for c in train)
    manifest["heldout_characters"] = sum(len(c) for c in heldout)
    return Corpus(train, heldout, manifest)


def _with_bos(tokenizer):
    """Plain ``tokenizer(text)`` starts with <s>, as every pretraining sequence does."""
    from tokenizers.processors import TemplateProcessing

    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    return tokenizer


def encode(chunks: list[str], tokenizer) -> np.ndarray:
    """One token stream: each chunk as <s> ids </s>."""
    ids = tokenizer(chunks, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    total = sum(len(x) + 2 for x in ids)
    stream = np.empty(total, dtype=np.uint16 if len(tokenizer) <= 65535 else np.int32)
    position = 0
    for piece in ids:
        stream[position] = bos
        stream[position + 1 : position + 1 + len(piece)] = piece
        stream[position + 1 + len(piece)] = eos
        position += len(piece) + 2
    return stream


def _token_streams(corpus: Corpus, tokenizer, work_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    from atoll.data.tasks import tokenizer_fingerprint

    key = hashlib.sha256(f"{corpus.manifest['sha256']}:{corpus.manifest.get('max_characters')}:{tokenizer_fingerprint(tokenizer)}".encode())
    path = work_dir / f"tokens-{key.hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as saved:
            return saved["train"], saved["heldout"]
    train_tokens, heldout_tokens = encode(corpus.train, tokenizer), encode(corpus.heldout, tokenizer)
    temporary = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(temporary, train=train_tokens, heldout=heldout_tokens)
    os.replace(temporary, path)
    return train_tokens, heldout_tokens


def pretrain(
    config: PretrainConfig,
    command: str,
    report: Report | None = None,
    message: Callable[[str], None] = print,
) -> PretrainResult:
    """Run every stage and write ``config.out_dir``; resumes from ``config.work_dir``."""
    from atoll.models.registry import train_bpe_tokenizer

    started = time.perf_counter()
    torch.set_num_threads(config.train.threads)
    work_dir = Path(config.work_dir)
    resume_step = check_resumable(work_dir, config.fingerprint())
    if resume_step:
        message(f"resuming from step {resume_step:,} in {work_dir}")
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "config.json").write_text(config.model_dump_json(indent=2) + "\n")

    corpus = _limit(
        build_corpus(config.corpus.sources, config.corpus.heldout_fraction, config.corpus.require_all), config.corpus.max_characters
    )
    message(
        f"corpus: {corpus.manifest['train_characters']:,} training characters in {corpus.manifest['train_chunks']:,} chunks, "
        f"{corpus.manifest['heldout_characters']:,} held out; sources {', '.join(s['name'] for s in corpus.manifest['sources'])}"
    )
    tokenizer = _with_bos(train_bpe_tokenizer(corpus.train, config.tokenizer.vocab_size, work_dir / "tokenizer"))
    train_tokens, heldout_tokens = _token_streams(corpus, tokenizer, work_dir)
    message(f"tokens: {len(train_tokens):,} training, {len(heldout_tokens):,} held out (vocabulary {len(tokenizer):,})")

    model = build_model(config, tokenizer)
    parameters = parameter_count(model)
    message(
        f"model: Llama, {parameters:,} parameters; {config.train.steps:,} steps of {config.train.batch_size} x {config.train.seq_len} tokens"
    )
    state = train(model, train_tokens, config, work_dir, report)

    # the shipped weights are fp16: measure what ships
    model.to(torch.float16).to(torch.float32)
    windows = heldout_windows(heldout_tokens, config.train.seq_len, config.train.eval_max_tokens)
    loss, accuracy, predicted = heldout_loss(model, windows)
    unigram = unigram_loss(train_tokens, windows, len(tokenizer))
    samples = continuations(model, tokenizer, seed=config.seed)
    numbers = {
        "name": config.name,
        "parameters": parameters,
        "vocab_size": len(tokenizer),
        "steps": state.step,
        "tokens_seen": state.step * config.train.batch_size * config.train.seq_len,
        "train_tokens": int(len(train_tokens)),
        "epochs": state.step * config.train.batch_size * config.train.seq_len / len(train_tokens),
        "train_wall_seconds": round(state.wall_seconds, 1),
        "threads": config.train.threads,
        "heldout_tokens": predicted,
        "heldout_loss": loss,
        "heldout_perplexity": perplexity(loss),
        "heldout_token_accuracy": accuracy,
        "unigram_perplexity": perplexity(unigram),
        "final_train_loss": state.losses[-1][1] if state.losses else None,
        "loss_curve": state.losses,
        "seed": config.seed,
        "config_fingerprint": config.fingerprint(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": command,
        "samples": samples,
        "corpus": corpus.manifest,
        "config": config.model_dump(mode="json"),
    }
    _export(model, tokenizer, numbers, Path(config.out_dir))
    message(
        f"held-out perplexity {numbers['heldout_perplexity']:.2f} (unigram {numbers['unigram_perplexity']:.2f}, vocabulary {len(tokenizer):,}); "
        f"wrote {config.out_dir} in {time.perf_counter() - started:.0f} s"
    )
    return PretrainResult(Path(config.out_dir), numbers)


def _export(model, tokenizer, numbers: dict, out_dir: Path) -> None:
    """fp16 safetensors, tokenizer, model card and numbers, written beside and then moved into place."""
    staging = out_dir.with_name(out_dir.name + f".{os.getpid()}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model = model.to(torch.float16)
    model.config.dtype = torch.float16
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / card.NUMBERS).write_text(json.dumps(numbers, indent=2) + "\n")
    (staging / "README.md").write_text(card.render(numbers))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    model.to(torch.float32)
