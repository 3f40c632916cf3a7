"""Two tiny causal LMs with different byte-level BPE vocabularies, saved as Hugging Face
directories (random init: these tests check protocols and math, not what the models know), and a
real cloud server on loopback serving one of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _corpora() -> tuple[list[str], list[str]]:
    from atoll.data.sources import load_source

    sft = load_source("synthetic-sft").columns
    cls = load_source("synthetic-cls").columns
    edge = [f"{p} {r}" for p, r in zip(sft["instruction"], sft["output"], strict=True)]
    cloud = list(cls["text"]) + [r for r in sft["output"][::3]] + ["Contact me at someone@example.org or call (415) 555-0100."] * 5
    return edge, cloud


def _save_tiny(directory: Path, tokenizer, hidden: int, seed: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharper than random-init's near-uniform output, so top-k differs from edge to cloud
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> dict[str, Path]:
    """{'edge': dir, 'cloud': dir, 'adapter': PEFT dir on the edge}: vocabularies of 400 and 700."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from atoll.models.registry import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("hybrid-models")
    edge_text, cloud_text = _corpora()
    edge_tok = train_bpe_tokenizer(edge_text, 400, root / "bpe")
    cloud_tok = train_bpe_tokenizer(cloud_text, 700, root / "bpe")
    edge = _save_tiny(root / "edge", edge_tok, 32, seed=1)
    cloud = _save_tiny(root / "cloud", cloud_tok, 48, seed=2)
    base = AutoModelForCausalLM.from_pretrained(edge)
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(root / "adapter")
    return {"edge": edge, "cloud": cloud, "adapter": root / "adapter"}


@pytest.fixture(scope="session")
def cloud_model(tiny_pair):
    from atoll.hybrid.loading import load_causal_lm
    from atoll.hybrid.server import CloudModel

    model, tokenizer = load_causal_lm(str(tiny_pair["cloud"]))
    return CloudModel(model, tokenizer, "tiny-cloud")


@pytest.fixture
def cloud_server(cloud_model):
    """Start a real server on a loopback port: ``cloud_server(delay_ms=..)`` -> BackgroundServer
    (``.url``, ``.server`` ... and ``.app.state.received``: every prompt it was sent)."""
    from atoll.hybrid.server import BackgroundServer, build_app

    started = []

    def start(**options) -> BackgroundServer:
        app = build_app(cloud_model, **options)
        server = BackgroundServer(app).__enter__()
        server.app = app
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)
