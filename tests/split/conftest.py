"""Split-learning fixtures: tiny models of every family, a 4-block local Llama directory, and
configs that run in seconds."""

from __future__ import annotations

import pytest

from .helpers import ATOLL_EDGE, save_causal_lm, split_overrides


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
    return save_causal_lm(tmp_path_factory.mktemp("llama4") / "model", synthetic_tokenizer, "llama", sizes)


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, synthetic_tokenizer):
    """A local random-init 3-block GPT-2 (absolute positions, tied LM head) with the synthetic BPE."""
    sizes = dict(n_embd=64, n_layer=3, n_head=4, n_positions=256)
    return save_causal_lm(tmp_path_factory.mktemp("gpt2") / "model", synthetic_tokenizer, "gpt2", sizes)


@pytest.fixture
def split_config(tmp_path):
    from atoll.split.config import split_config_with

    def make(**extra):
        return split_config_with(split_overrides(tmp_path / "runs", **extra))

    return make


@pytest.fixture(scope="session")
def atoll_edge_setup(tmp_path_factory):
    """atoll's pretrained atoll-edge on Shakespeare lines (``helpers.ATOLL_EDGE``), loaded once; runs
    with other defenses or attacks use ``helpers.reconfigured``."""
    from atoll.split.config import split_config_with
    from atoll.split.setup import prepare

    root = tmp_path_factory.mktemp("atoll-edge") / "runs"
    return prepare(split_config_with(split_overrides(root, **ATOLL_EDGE)))
