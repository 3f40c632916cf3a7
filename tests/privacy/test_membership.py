"""Membership inference: the metrics by hand, and each score separating a fine-tuned model's
training texts from held-out texts (and not before fine-tuning)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atoll.privacy.attacks.membership import (
    loss_score,
    min_k_score,
    reference_score,
    roc_auc,
    token_log_probs,
    tpr_at_fpr,
    zlib_score,
)
from lm_fixtures import tiny_lora_llama_fixture, tweet_tokenizer_fixture, tweets_fixture  # noqa: F401 (fixtures)


def test_auc_and_tpr_at_low_fpr_by_hand():
    members, others = np.array([3.0, 4.0, 5.0]), np.array([1.0, 2.0, 3.5])
    assert roc_auc(members, others) == pytest.approx(8 / 9)
    assert roc_auc(np.array([1.0]), np.array([1.0])) == 0.5
    assert tpr_at_fpr(members, others, fpr=0.01) == pytest.approx(2 / 3)  # threshold: above every non-member
    assert tpr_at_fpr(members, others, fpr=0.34) == 1.0  # one false positive allowed: threshold 2


def test_scores_by_hand():
    log_probs = [torch.tensor([-1.0, -3.0, -2.0, -6.0, -0.5])]
    assert loss_score(log_probs).tolist() == [pytest.approx(-2.5)]
    assert min_k_score(log_probs, k=0.4).tolist() == [pytest.approx(-4.5)]  # mean of the 2 lowest
    assert zlib_score(log_probs, ["aaaa"]).tolist() == [pytest.approx(-2.5 / 12)]  # zlib('aaaa') is 12 bytes
    assert reference_score(log_probs, [torch.tensor([-3.0])]).tolist() == [pytest.approx(0.5)]


def fine_tune(model, ids, mask, steps: int, seed: int = 0):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    for _ in range(steps):
        batch = torch.randperm(ids.shape[0], generator=generator)[:8]
        loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def test_each_score_separates_members_after_fine_tuning(tiny_lora_llama, tweet_tokenizer, tweets):
    tokenizer = tweet_tokenizer

    def encode(texts):
        batch = tokenizer([tokenizer.bos_token + t for t in texts], return_tensors="pt", padding=True, truncation=True, max_length=32)
        return batch["input_ids"], batch["attention_mask"]

    members, others, population = tweets[2000:2024], tweets[2100:2124], tweets[2200:2248]
    member_ids, member_mask = encode(members)
    other_ids, other_mask = encode(others)
    target = tiny_lora_llama(rank=8, nonzero_B=False, extra=("lm_head",))
    before = {
        "member": loss_score(token_log_probs(target, member_ids, member_mask)),
        "other": loss_score(token_log_probs(target, other_ids, other_mask)),
    }
    assert abs(roc_auc(before["member"], before["other"]) - 0.5) < 0.25  # nothing to infer before training
    fine_tune(target, member_ids, member_mask, steps=80)
    reference = fine_tune(tiny_lora_llama(rank=8, nonzero_B=False, extra=("lm_head",), seed=1), *encode(population), steps=80)
    target_member, target_other = token_log_probs(target, member_ids, member_mask), token_log_probs(target, other_ids, other_mask)
    reference_member, reference_other = (
        token_log_probs(reference, member_ids, member_mask),
        token_log_probs(reference, other_ids, other_mask),
    )
    results = {
        "loss": (loss_score(target_member), loss_score(target_other)),
        "zlib": (zlib_score(target_member, members), zlib_score(target_other, others)),
        "min_k": (min_k_score(target_member), min_k_score(target_other)),
        "reference": (reference_score(target_member, reference_member), reference_score(target_other, reference_other)),
    }
    for name, (member_scores, other_scores) in results.items():
        assert roc_auc(member_scores, other_scores) > 0.9, name
        assert tpr_at_fpr(member_scores, other_scores, 0.01) > 0.5, name


def test_classifier_log_probs_are_the_log_softmax_at_the_label():
    from types import SimpleNamespace

    from atoll.privacy.attacks.membership import classifier_log_probs

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=input_ids.float()[:, :3])

    ids = torch.tensor([[0, 0, 0, 9], [2, 0, 1, 9]])
    values = classifier_log_probs(Fixed(), ids, torch.ones_like(ids), torch.tensor([1, 0]))
    assert [float(v) for v in values] == [pytest.approx(np.log(1 / 3)), pytest.approx(2 - np.log(np.exp(2) + 1 + np.e))]
