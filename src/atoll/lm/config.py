"""Keys of a pretraining config (``atoll pretrain CONFIG``): corpus, tokenizer, model, training.

Unknown keys and bad values are ConfigErrors naming the key, as for run configs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from atoll.config import apply_override, check_scalars, read_yaml
from atoll.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusConfig(_Section):
    sources: list[str] = Field(
        default_factory=lambda: ["shakespeare", "bible-kjv", "fortunes", "wordnet"], description="corpus sources (atoll.lm.corpus.SOURCES)"
    )
    heldout_fraction: float = Field(0.01, gt=0, lt=0.5, description="share of chunks held out for perplexity")
    require_all: bool = Field(True, description="fail when a source is absent (false: skip it and say so in the card)")
    max_characters: int | None = Field(None, gt=0, description="use at most this many characters of training text (tests, trials)")


class TokenizerConfig(_Section):
    vocab_size: int = Field(4096, ge=300, le=65535, description="byte-level BPE vocabulary size, special tokens included")


class ArchitectureConfig(_Section):
    hidden_size: int = Field(256, gt=0, description="Llama hidden size")
    intermediate_size: int = Field(688, gt=0, description="MLP width")
    layers: int = Field(4, gt=0, description="decoder layers")
    heads: int = Field(8, gt=0, description="attention heads (hidden_size must divide by it)")
    kv_heads: int = Field(4, gt=0, description="key/value heads (grouped-query attention; heads must divide by it)")
    max_position: int = Field(512, gt=0, description="longest sequence the model accepts (RoPE)")
    tie_embeddings: bool = Field(False, description="share the input embedding and the LM head")


class PretrainTrainConfig(_Section):
    steps: int = Field(1000, gt=0, description="optimizer steps")
    batch_size: int = Field(16, gt=0, description="sequences per step")
    seq_len: int = Field(128, gt=1, description="tokens per sequence")
    lr: float = Field(2e-3, gt=0, description="peak AdamW learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine schedule ends at lr * min_lr_ratio")
    warmup_steps: int = Field(100, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices (not on norms)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient norm clipping")
    threads: int = Field(1, gt=0, description="torch CPU threads (results are identical for a seed at a fixed thread count)")
    checkpoint_every: int = Field(100, gt=0, description="write a resumable checkpoint every N steps")
    eval_max_tokens: int = Field(200_000, gt=0, description="held-out tokens used for perplexity")


class PretrainConfig(_Section):
    name: str = Field("atoll-model", description="model name (card title)")
    seed: int = Field(0, description="seed of initialisation and batch sampling")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ArchitectureConfig = Field(default_factory=ArchitectureConfig)
    train: PretrainTrainConfig = Field(default_factory=PretrainTrainConfig)
    work_dir: str = Field("runs/pretrain/atoll-model", description="checkpoints, tokenised corpus and logs (a rerun resumes here)")
    out_dir: str = Field("runs/pretrain/atoll-model/model", description="the finished Hugging Face model directory")

    def fingerprint(self) -> str:
        """A hash of everything that changes the result (not where it is written, not eval size)."""
        tree = self.model_dump(mode="json")
        tree.pop("work_dir")
        tree.pop("out_dir")
        tree.pop("name")
        tree["train"].pop("checkpoint_every")
        tree["train"].pop("eval_max_tokens")
        return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        return f"unknown key '{key}' in the pretraining config (see configs/pretrain/edge.yaml)"
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {first['msg']}{shown}"


def load_pretrain_config(path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """Read a pretraining YAML and apply ``key=value`` overrides."""
    tree: dict[str, Any] = read_yaml(path)
    for assignment in overrides or []:
        apply_override(tree, assignment)
    check_scalars(PretrainConfig, tree)  # `layers: true` is not one layer, nor .inf a number
    try:
        config = PretrainConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    arch = config.model
    if arch.hidden_size % arch.heads or arch.heads % arch.kv_heads:
        raise ConfigError(
            f"model: hidden_size {arch.hidden_size}, heads {arch.heads}, kv_heads {arch.kv_heads} do not divide",
            "hidden_size must divide by heads and heads by kv_heads",
        )
    if config.train.seq_len > arch.max_position:
        raise ConfigError(f"train.seq_len {config.train.seq_len} exceeds model.max_position {arch.max_position}", "raise max_position")
    return config
