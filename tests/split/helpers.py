"""Helpers of the split-learning tests: tiny models of every family and small configs."""

from __future__ import annotations

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


def save_causal_lm(directory, tokenizer, model_type: str, sizes: dict):
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


# atoll's own pretrained causal LM (4 Llama blocks, BPE 4,096) on Shakespeare lines, head = the
# embeddings + 1 block: the overrides the atoll-edge tests share (with split_overrides)
ATOLL_EDGE = {
    "model.name": "atoll-edge",
    "model.max_length": 32,
    "data.source": "shakespeare",
    "data.max_examples": 200,
    "data.test_size": 20,
    "train.lr": 0.001,
}


def reconfigured(setup, root, overrides: dict):
    """``setup`` (data, tokenizer and model already loaded) with the config of ``overrides``, which
    must name the same model and data: runs with other defenses or attacks share one load."""
    import dataclasses

    from atoll.split.config import split_config_with

    return dataclasses.replace(setup, config=split_config_with(split_overrides(root, **overrides)))


def rare_class_source(directory):
    """A JSONL classification source from the synthetic topic texts: one topic's examples, 1 in 8
    of them kept, are the rare class (about 1 in 9 of 400 rows), all others the common class."""
    import json

    from atoll.data.sources import load_source

    raw = load_source("synthetic-cls").columns
    topic = sorted(set(raw["label"]))[0]
    rows = []
    for index, (text, label) in enumerate(zip(raw["text"], raw["label"], strict=True)):
        if label != topic:
            rows.append({"text": text, "label": "common"})
        elif index % 8 == 0:
            rows.append({"text": text, "label": "rare"})
    source = directory / "imbalanced.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows[:400]))
    return source
