"""Generation across the cut with a KV cache on both sides: the same tokens as the unsplit model's
own greedy ``generate``, and after the prompt each new token sends one position each way."""

from __future__ import annotations

import pytest
import torch

from atoll.data.batching import prompt_batch
from atoll.split.runner import connect
from atoll.split.setup import prepare


def unsplit_with_both_adapters(setup, tmp_path, session):
    """The full base model with the data party's and the model party's PEFT adapters loaded from
    disk, both active (their blocks are disjoint)."""
    from peft import PeftModel

    data_dir, model_dir = tmp_path / "data", tmp_path / "model"
    session.parties[0].model.save(data_dir)
    session.model_party.model.save(model_dir)
    base = prepare(setup.config).model
    peft = PeftModel.from_pretrained(base, str(data_dir / "adapter"))
    peft.load_adapter(str(model_dir / "adapter"), adapter_name="model_party")
    peft.base_model.set_adapter(["default", "model_party"])
    return peft.eval()


def unequal_prompts(data, indices, pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts of unequal lengths: the k-th prompt loses its first 3k tokens after BOS."""
    batch = prompt_batch(data, indices, pad_id)
    rows = [torch.cat([ids[:1], ids[1 + 3 * k :]]) for k, ids in enumerate(batch["input_ids"])]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = ids
        mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@pytest.mark.parametrize("model,partition", [("llama", "head-tail"), ("llama", "head-body-tail"), ("gpt2", "head-tail")])
def test_split_generation_equals_the_unsplit_models_generate(split_config, llama4_dir, gpt2_dir, tmp_path, model, partition):
    """Llama's rotary attention only sees relative positions; GPT-2's absolute positions also check
    that left padding is numbered as Hugging Face numbers it."""
    extra = {
        "model.name": str(llama4_dir if model == "llama" else gpt2_dir),
        "data.source": "synthetic-sft",
        "split.partition": partition,
        "model.max_length": 40,
        "train.lr": 0.002,
        "record.every": 1,
        "record.phases": "[generate]",
    }
    if partition == "head-body-tail":
        extra["split.tail_blocks"] = 1
    setup = prepare(split_config(**extra))
    session = connect(setup, None)
    party = session.parties[0]
    for _ in range(3):  # adapters move off their zero start, the output stays diverse
        party.train_step()
    data = setup.data.data
    batch = unequal_prompts(data, setup.test_indices[:4], setup.data.pad_id)
    assert (batch["attention_mask"] == 0).any()
    # no end-of-sequence stop: a briefly trained model may end at once; 12 tokens each are compared
    scores: list[torch.Tensor] = []
    generated = party.generate(batch["input_ids"], batch["attention_mask"], 12, None, setup.data.pad_id, logits=scores)

    unsplit = unsplit_with_both_adapters(setup, tmp_path, session)
    unsplit.generation_config.eos_token_id = None
    with torch.no_grad():
        output = unsplit.generate(
            **batch, max_new_tokens=12, do_sample=False, pad_token_id=setup.data.pad_id, return_dict_in_generate=True, output_logits=True
        )
    reference = output.sequences[:, batch["input_ids"].shape[1] :]
    assert generated.shape == reference.shape == (4, 12)
    assert torch.equal(generated, reference)
    # the logits too (a random-init model's greedy tokens can repeat; its logits do not hide errors)
    assert torch.allclose(torch.stack(scores), torch.stack(output.logits), atol=1e-5, rtol=1e-4)

    # one position per new token: the prefill carries the prompt, every later message one column
    messages = session.model_party.transcript.of_kind("generate")
    sizes = [m.tensors["activations"].shape[1] for m in messages]
    assert sizes[0] == batch["input_ids"].shape[1]
    assert sizes[1:] == [1] * (len(sizes) - 1) and len(sizes) == generated.shape[1]
    replies = session.channels[0].traffic.to_data["generate"]
    assert replies > 0
    assert session.model_party.sessions == {}  # the session's cache was released at the end
