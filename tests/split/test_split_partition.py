"""Partitions: run one after another, the slices give the unsplit model's outputs for every family,
head and cut; the parties' tensors together are exactly the unsplit model's; cuts are checked."""

from __future__ import annotations

import copy

import pytest
import torch

from atoll.errors import ConfigError, ModelError
from atoll.split.partition import Cut
from atoll.split.slices import LoRASettings, PartyModel, SliceTuning
from .helpers import tiny_task_model

CASES = [
    (model_type, head)
    for model_type in ("llama", "qwen2", "gpt2", "bert")
    for head in ("causal-lm", "classification", "question-answering")
    if not (model_type == "bert" and head == "causal-lm")
]


def _inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (3, 9), generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _parties(model, head, cut, tuning=None):
    tuning = tuning or {}
    data = PartyModel(copy.deepcopy(model), head, cut.of_party("data"), tuning, LoRASettings(rank=4), 0)
    party = PartyModel(copy.deepcopy(model), head, cut.of_party("model"), tuning, LoRASettings(rank=4), 0)
    data.train(False)
    party.train(False)
    return data, party


def _split_forward(data, party, cut, ids, mask):
    hidden = data.run("head", data.embed_tokens(ids), mask)
    if cut.kind == "head-tail":
        return party.run("tail", hidden, mask)
    return data.run("tail", party.run("body", hidden, mask), mask)


@pytest.mark.parametrize("model_type,head", CASES)
@pytest.mark.parametrize("kind,head_blocks,tail_blocks", [("head-tail", 1, 0), ("head-body-tail", 1, 2), ("head-tail", 0, 0)])
def test_slices_reproduce_the_unsplit_forward(model_type, head, kind, head_blocks, tail_blocks):
    model = tiny_task_model(model_type, head)
    ids, mask = _inputs()
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask)
        reference = torch.stack([output.start_logits, output.end_logits], -1) if head == "question-answering" else output.logits
        cut = Cut(kind, head_blocks, tail_blocks, 4)
        tuning = {"head": SliceTuning("frozen")} if head_blocks == 0 else None  # no blocks to adapt
        split = _split_forward(*_parties(model, head, cut, tuning), cut, ids, mask)
    if head == "classification":
        assert torch.equal(split, reference)
    else:  # token outputs: padded positions may differ (their positions are numbered differently)
        real = mask.bool()
        assert torch.equal(split[real], reference[real])


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "bert"])
def test_the_parties_hold_the_unsplit_model_exactly_once(model_type):
    head = "classification"
    model = tiny_task_model(model_type, head)
    cut = Cut("head-body-tail", 1, 1, 4)
    frozen = {role: SliceTuning("frozen") for role in ("head", "body", "tail")}
    data, party = _parties(model, head, cut, frozen)
    full = dict(model.named_parameters(remove_duplicate=False))
    held = [dict(p.model.named_parameters()) for p in (data, party)]
    assert not held[0].keys() & held[1].keys()
    union = held[0] | held[1]
    untied = {name for name in full if name not in union}
    assert not untied, untied
    assert all(torch.equal(union[name], full[name]) for name in full)
    assert data.role_of(f"{data.family.blocks_path()}.3.anything") == "tail"
    with pytest.raises(RuntimeError, match="does not hold block 1"):
        data.family.blocks()[1]()


def test_lora_full_and_frozen_slices_train_what_they_say(tmp_path):
    model = tiny_task_model("llama", "classification")
    cut = Cut("head-body-tail", 1, 1, 4)
    data = PartyModel(
        copy.deepcopy(model),
        "classification",
        cut.of_party("data"),
        {"head": SliceTuning("full"), "tail": SliceTuning("lora")},
        LoRASettings(rank=2),
        0,
    )
    head_params = set(map(id, data.trainable["head"]))
    assert head_params == {id(p) for n, p in data.model.named_parameters() if n.startswith(("model.embed_tokens", "model.layers.0."))}
    tail_names = {n for n, p in data.model.named_parameters() if id(p) in set(map(id, data.trainable["tail"]))}
    assert tail_names and all(".lora_" in n or ".modules_to_save." in n for n in tail_names)
    assert any("score.modules_to_save" in n for n in tail_names)  # the new task head trains in full next to LoRA
    written = data.save(tmp_path)
    assert written == ["adapter", "full_weights.safetensors"]
    from safetensors.torch import load_file

    full = load_file(str(tmp_path / "full_weights.safetensors"))
    assert set(full) == {n for n, _ in data.model.named_parameters() if n.startswith(("model.embed_tokens", "model.layers.0."))}
    frozen = PartyModel(copy.deepcopy(model), "classification", cut.of_party("model"), {"body": SliceTuning("frozen")}, LoRASettings(), 0)
    assert frozen.parameters() == [] and frozen.peft is None


def test_bad_cuts_and_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="leaves the model party 0 of the model's 2 blocks"):
        Cut("head-tail", 2, 0, 2)
    with pytest.raises(ConfigError, match="needs partition head-body-tail"):
        Cut("head-tail", 1, 1, 4)
    model = tiny_task_model("llama", "classification")
    with pytest.raises(ConfigError, match="head slice has no blocks"):
        PartyModel(copy.deepcopy(model), "classification", Cut("head-tail", 0, 0, 4).of_party("data"), {}, LoRASettings(), 0)
    with pytest.raises(ConfigError, match="trainable_modules names 'lm_head'"):
        PartyModel(
            copy.deepcopy(model),
            "classification",
            Cut("head-tail", 1, 0, 4).of_party("data"),
            {"head": SliceTuning("lora", ("lm_head",))},
            LoRASettings(),
            0,
        )
    with pytest.raises(ModelError, match="does not know how to cut a 't5' model"):
        from transformers import AutoConfig, T5ForConditionalGeneration

        from atoll.split.families import family_of

        family_of(
            T5ForConditionalGeneration(AutoConfig.for_model("t5", d_model=16, d_ff=16, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)),
            "causal-lm",
        )
