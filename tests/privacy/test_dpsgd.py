"""Example-level DP-SGD with opacus on the LoRA parameters of a PEFT causal LM."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from atoll.privacy.dp.accounting import epsilon_after
from atoll.privacy.dp.dpsgd import DPSGDPlan, causal_lm_example_losses, dp_sgd_train


def tiny_lora_lm(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    for p in model.parameters():
        p.requires_grad_(False)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # a nonzero B, as after a first round, so A receives gradients too
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft


def examples(count: int, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (count, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_one_example_step_is_the_clipped_gradient(mode):
    """With σ = 0 and one example sampled with q = 1, DP-SGD's SGD step is exactly −lr·clip(g, C)."""
    model = tiny_lora_lm()
    data = examples(1)
    before = lora_params(model)
    loss = causal_lm_example_losses(model, data).mean()
    names = list(before)
    grads = torch.autograd.grad(loss, [p for n, p in model.named_parameters() if n in before])
    norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    bound = norm / 4  # the example is clipped
    plan = DPSGDPlan(noise_multiplier=0.0, max_grad_norm=bound, sample_rate=1.0, steps=1, lr=0.1, grad_sample_mode=mode)
    dp_sgd_train(model, data, plan, causal_lm_example_losses, torch.Generator().manual_seed(0))
    after = lora_params(model)
    factor = bound / (norm + 1e-6)  # opacus' clip factor
    for name, grad in zip(names, grads, strict=True):
        assert torch.allclose(after[name] - before[name], -0.1 * factor * grad, atol=1e-6, rtol=1e-4)


def test_only_lora_moves_hooks_are_removed_and_epsilon_is_the_accountants():
    model = tiny_lora_lm(1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    plan = DPSGDPlan(noise_multiplier=1.1, max_grad_norm=1.0, sample_rate=0.25, steps=6, lr=0.05)
    result = dp_sgd_train(model, examples(16), plan, causal_lm_example_losses, torch.Generator().manual_seed(0))
    assert result.epsilon == pytest.approx(epsilon_after(1.1, 0.25, 6, 1e-5))
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[name])
        assert not hasattr(p, "grad_sample") and p.grad is None
    # the model is a plain module again: a backward pass leaves no per-example gradients behind
    causal_lm_example_losses(model, examples(2)).mean().backward()
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())


def test_noise_has_the_dp_sgd_scale_on_an_empty_sample():
    """q so small that no example is drawn: the step is pure N(0, σ²C²)/(qn) noise."""
    model = tiny_lora_lm(2)
    before = lora_params(model)
    plan = DPSGDPlan(noise_multiplier=2.0, max_grad_norm=0.5, sample_rate=1e-9, steps=1, lr=1.0)
    dp_sgd_train(model, examples(4), plan, causal_lm_example_losses, torch.Generator().manual_seed(0))
    moved = torch.cat([(lora_params(model)[n] - before[n]).reshape(-1) for n in before])
    expected_std = 2.0 * 0.5 / (1e-9 * 4)
    assert float(moved.std()) == pytest.approx(expected_std, rel=0.1)
