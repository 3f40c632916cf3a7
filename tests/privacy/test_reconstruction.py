"""Reconstruction of a client's text from its LoRA update: DAGER's span test recovers it exactly,
LAMP-style gradient matching far above chance; clipping plus Gaussian noise (DP) defeats both."""

from __future__ import annotations

import pytest
import torch

from atoll.privacy.attacks.reconstruction.dager import DagerAttack, LoRAGradient, row_space, span_residuals
from atoll.privacy.attacks.reconstruction.lamp import LampAttack, LampPlan
from atoll.privacy.attacks.rouge import reconstruction_scores, rouge_l, rouge_n
from atoll.privacy.dp.clipping import clip_to_norm
from lm_fixtures import tiny_lora_llama_fixture, tweet_tokenizer_fixture, tweets_fixture  # noqa: F401 (fixtures)

LAYER = "base_model.model.model.layers.{}.self_attn.q_proj"


def test_rouge_by_hand():
    assert rouge_n("the cat sat", "the cat sat", 1) == 1.0
    assert rouge_n("the cat", "the cat sat down", 1) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert rouge_n("cat the", "the cat", 2) == 0.0
    assert rouge_l("a b c d", "a x c d") == pytest.approx(0.75)
    scores = reconstruction_scores(["a b", "x"], ["a b", "y"])
    assert scores["exact_match"] == 0.5 and scores["rouge1"] == 0.5


def test_span_test_separates_inputs_from_other_vectors():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(5, 16, generator=generator, dtype=torch.float64)
    deltas = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    gradient = deltas @ inputs  # Σ_t δ_t x_tᵀ
    basis = row_space(gradient, 1e-9)
    assert basis.shape == (5, 16)
    assert float(span_residuals(basis, inputs).max()) < 1e-10
    assert float(span_residuals(basis, torch.randn(50, 16, generator=generator, dtype=torch.float64)).min()) > 0.1


def client_update(model, ids: torch.Tensor, lr: float = 0.5) -> dict[str, torch.Tensor]:
    """One local SGD step of the client on its text: the upload is −lr·∇ (what the server sees)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    grads = torch.autograd.grad(loss, list(params.values()))
    return {name: -lr * g for name, g in zip(params, grads, strict=True)}


def privatize(update: dict[str, torch.Tensor], noise_multiplier: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Clip the whole update to half its norm and add N(0, σ²C²): the DP-SGD step of one example."""
    names = list(update)
    flat = torch.cat([update[n].reshape(-1) for n in names])
    bound = float(flat.norm()) / 2
    noisy = clip_to_norm(flat, bound) + torch.normal(
        0.0, noise_multiplier * bound, flat.shape, generator=torch.Generator().manual_seed(seed)
    )
    out, offset = {}, 0
    for name in names:
        out[name] = noisy[offset : offset + update[name].numel()].reshape(update[name].shape)
        offset += update[name].numel()
    return out


def lora_view(model, update: dict[str, torch.Tensor], layer: int) -> LoRAGradient:
    prefix = LAYER.format(layer)
    params = dict(model.named_parameters())
    return LoRAGradient(
        update[prefix + ".lora_A.default.weight"],
        update[prefix + ".lora_B.default.weight"],
        params[prefix + ".lora_A.default.weight"].detach(),
    )


def test_dager_recovers_the_text_exactly_from_one_update_and_fails_under_dp(tiny_lora_llama, tweet_tokenizer, tweets):
    model = tiny_lora_llama(rank=32, targets=("q_proj",))
    tokenizer = tweet_tokenizer
    ids = tokenizer([tokenizer.bos_token + tweets[17]], return_tensors="pt", truncation=True, max_length=16)["input_ids"]
    attack = DagerAttack(model, LAYER.format(0), LAYER.format(1), len(tokenizer))
    update = client_update(model, ids)
    result = attack.reconstruct(
        lora_view(model, update, 0), lora_view(model, update, 1), max_length=16, first_tokens=[tokenizer.bos_token_id]
    )
    # every token but the last (whose output no loss reads, so it leaves no gradient) comes back in order
    assert result.sequences == [ids[0, :-1].tolist()]
    truth = tokenizer.decode(ids[0, :-1], skip_special_tokens=True)
    assert reconstruction_scores([tokenizer.decode(result.sequences[0], skip_special_tokens=True)], [truth])["exact_match"] == 1.0
    noisy = privatize(update, noise_multiplier=1.0)
    private = attack.reconstruct(
        lora_view(model, noisy, 0), lora_view(model, noisy, 1), max_length=16, first_tokens=[tokenizer.bos_token_id]
    )
    assert private.tokens == [] and private.sequences == []


def test_lamp_recovers_far_above_chance_and_less_under_dp(tiny_lora_llama, tweet_tokenizer, tweets):
    model = tiny_lora_llama(rank=8)
    tokenizer = tweet_tokenizer
    ids = tokenizer([tokenizer.bos_token + tweets[1000]], return_tensors="pt", truncation=True, max_length=8)["input_ids"]
    truth = ids[0].tolist()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    plan = LampPlan(steps=200, alternatives=4, sweeps=2)

    def token_accuracy(update):
        gradient = {n: -u for n, u in update.items()}  # the server knows the step was −lr·∇
        tokens = LampAttack(model, names, gradient, plan).reconstruct(len(truth), tokenizer.bos_token_id)
        return sum(a == b for a, b in zip(tokens[1:], truth[1:], strict=False)) / (len(truth) - 1)

    update = client_update(model, ids)
    clean = token_accuracy(update)
    private = token_accuracy(privatize(update, noise_multiplier=1.0))
    assert clean >= 0.4  # chance is 1 / 2048 per position
    assert private <= clean / 2


def test_lamp_refuses_attention_without_double_backward(tiny_lora_llama):
    model = tiny_lora_llama(rank=4)
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="set_attn_implementation"):
        LampAttack(model, [], {}, LampPlan())
