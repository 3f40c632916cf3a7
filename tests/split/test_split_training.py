"""With defenses and clipping off, split fine-tuning follows the unsplit model step for step.

Both parties run AdamW on their own parameters; AdamW is per-parameter, so two optimizers over
disjoint parameter sets equal one over their union. The tolerance below covers floating-point
summation order only: 1e-5 on every step's loss over 8 steps (measured: exact equality on this
machine for the decoder paths)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from atoll.seeding import numpy_rng
from atoll.split.runner import connect
from atoll.split.setup import prepare
from atoll.split.slices import init_lora
from atoll.split.tasks import task_loss

TOLERANCE = 1e-5


def unsplit_losses(setup, steps: int) -> list[float]:
    """The same data, seed and LoRA on the whole model, trained in one piece with one AdamW."""
    from peft import LoraConfig, get_peft_model

    from atoll.models.registry import target_modules

    config = setup.config
    model = copy.deepcopy(setup.model)
    for param in model.parameters():
        param.requires_grad_(False)
    heads = {"classification": ["score"], "question-answering": ["qa_outputs"]}.get(setup.head)
    lora = LoraConfig(
        r=config.model.lora.rank, lora_alpha=config.model.lora.alpha, target_modules=target_modules(model, "auto"), modules_to_save=heads
    )
    peft = get_peft_model(model, lora)
    init_lora(peft, config.seed)
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay)
    batches = setup.data.train_batches(setup.party_indices[0], config.train.batch_size, numpy_rng(config.seed, "split-batches", 0), True)
    losses = []
    for _ in range(steps):
        batch = next(batches)
        peft.train()
        outputs = peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = task_loss(setup.head, outputs, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def split_losses(setup, steps: int) -> list[float]:
    session = connect(setup, None)
    party = session.parties[0]
    return [party.train_step()["loss"] for _ in range(steps)]


@pytest.mark.parametrize(
    "case",
    [
        dict(),  # tiny-llama classification, head-tail 1 + 1
        dict(partition="head-body-tail", task="sft", model="llama4"),  # language modelling, 1 + 2 + 1
    ],
    ids=["head-tail-classification", "head-body-tail-sft"],
)
def test_split_training_matches_the_unsplit_model(split_config, llama4_dir, case):
    overrides = {"train.max_grad_norm": "null", "train.steps": 8}
    if case.get("model") == "llama4":
        overrides.update(
            {"model.name": str(llama4_dir), "data.source": "synthetic-sft", "split.partition": "head-body-tail", "split.tail_blocks": 1}
        )
    setup = prepare(split_config(**overrides))
    reference = unsplit_losses(setup, 8)
    split = split_losses(setup, 8)
    assert reference[-1] < reference[0]  # it learns, so the comparison is not of constants
    assert np.max(np.abs(np.array(split) - np.array(reference))) <= TOLERANCE, (split, reference)


def test_split_gradients_are_the_unsplit_gradients(split_config, llama4_dir):
    """The gradient of every trainable tensor of all three slices (head-body-tail) on the first
    batch equals the unsplit model's (AdamW hides a wrongly scaled gradient; this does not)."""
    from peft import LoraConfig, get_peft_model

    setup = prepare(
        split_config(
            **{
                "model.name": str(llama4_dir),
                "data.source": "synthetic-sft",
                "split.partition": "head-body-tail",
                "split.tail_blocks": 1,
                "train.max_grad_norm": "null",
            }
        )
    )
    session = connect(setup, None)
    party, model_party = session.parties[0], session.model_party
    captured: dict[str, torch.Tensor] = {}

    def capture(holder, optimizer):
        original = optimizer.step

        def step(*args, **kwargs):
            captured.update({n: p.grad.clone() for n, p in holder.model.named_parameters() if p.grad is not None})
            return original(*args, **kwargs)

        optimizer.step = step

    capture(party.model, party.optimizer)
    capture(model_party.model, model_party.optimizer)
    party.train_step()

    from atoll.models.registry import target_modules

    model = copy.deepcopy(setup.model)
    for param in model.parameters():
        param.requires_grad_(False)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=target_modules(model, "auto")))
    init_lora(peft, setup.config.seed)
    batch = setup.data.collate(party.batch_log[1])
    peft.train()
    task_loss(setup.head, peft(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch).backward()
    reference = {n: p.grad for n, p in peft.base_model.model.named_parameters() if p.grad is not None}
    assert captured.keys() == reference.keys() and len(reference) == 16  # 4 blocks x (q, v) x (A, B)
    for name, gradient in reference.items():
        assert torch.allclose(captured[name], gradient, rtol=1e-5, atol=1e-8), name
    assert any(g.abs().sum() > 0 for n, g in reference.items() if "lora_B" in n and ".layers.0." in n)
