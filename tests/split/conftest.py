"""Split-learning fixtures: tiny models of every family, a 4-block local Llama directory, and
configs that run in seconds."""

from __future__ import annotations

import pytest
import torch


def tiny_task_model(model_type: str, head: str, blocks: int = 4, vocab: int = 300, seed: int = 0):
    """A random-init model of ``model_type`` with a ``head`` ("causal-lm", "classification",
    "question-answering"), small enough to build in milliseconds."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    if model_type == "gpt2":
        sizes = dict(n_embd=32, n_layer=blocks, n_head=4, bos_token_id=1, eos_token_id=2)
    elif model_type == "bert":
        sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=blocks, num_attention_heads=4)
    else:
        sizes = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=blocks,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    extra = {"num_labels": 3} if head == "classification" else {}
    config = AutoConfig.for_model(model_type, vocab_size=vocab, pad_token_id=0, **sizes, **extra)
    auto = {
        "causal-lm": AutoModelForCausalLM,
        "classification": AutoModelForSequenceClassification,
        "question-answering": AutoModelForQuestionAnswering,
    }[head]
    torch.manual_seed(seed)
    return auto.from_config(config).eval()


@pytest.fixture(scope="session")
def synthetic_tokenizer(tmp_path_factory):
    """A byte-level BPE (512) trained on the synthetic instruction and topic texts."""
    from atoll.data.sources import load_source
    from atoll.data.tasks import TaskSpec
    from atoll.models.registry import train_bpe_tokenizer

    raw = load_source("synthetic-sft")
    spec = TaskSpec("sft", prompt_column="instruction", response_column="output")
    corpus = spec.corpus(raw) + [str(t) for t in load_source("synthetic-cls").columns["text"]]
    return train_bpe_tokenizer(corpus, 512, tmp_path_factory.mktemp("bpe"))


def _save_causal_lm(directory, tokenizer, model_type: str, sizes: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sizes,
    )
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def llama4_dir(tmp_path_factory, synthetic_tokenizer):
    """A local Hugging Face directory: a random-init 4-block Llama (hidden 64) with the synthetic
    BPE (so head-body-tail cuts have room: 1 + 2 + 1)."""
    sizes = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return _save_causal_lm(tmp_path_factory.mktemp("llama4") / "model", synthetic_tokenizer, "llama", sizes)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, synthetic_tokenizer):
    """A local random-init 3-block GPT-2 (absolute positions, tied LM head) with the synthetic BPE."""
    sizes = dict(n_embd=64, n_layer=3, n_head=4, n_positions=256)
    return _save_causal_lm(tmp_path_factory.mktemp("gpt2") / "model", synthetic_tokenizer, "gpt2", sizes)


def split_overrides(root, **extra) -> list[str]:
    values = {
        "model.name": "tiny-llama",
        "data.source": "synthetic-cls",
        "data.max_examples": 240,
        "data.test_size": 40,
        "model.max_length": 24,
        "train.steps": 6,
        "train.batch_size": 8,
        "train.lr": 0.01,
        "eval.every": 3,
        "eval.batch_size": 64,
        "run.root": str(root),
        "run.plots": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def split_config(tmp_path):
    from atoll.split.config import split_config_with

    def make(**extra):
        return split_config_with(split_overrides(tmp_path / "runs", **extra))

    return make
