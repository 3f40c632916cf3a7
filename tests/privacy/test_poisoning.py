"""Poisoning attacks craft exactly what their papers define; attacker selection is seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atoll.errors import ConfigError
from atoll.privacy.attacks.backdoor import Trigger, model_replacement, poison_classification
from atoll.privacy.attacks.byzantine import ALIE, IPM, GaussianNoise, MinMax, SignFlip, alie_z
from atoll.privacy.attacks.free_riders import noise_update, stale_update, zero_update
from atoll.privacy.attacks.label_flipping import flip_labels
from atoll.privacy.attacks.selection import choose_attackers


def test_attackers_by_id_or_seeded_fraction():
    assert choose_attackers(10, ids=[3, 1, 3]) == [1, 3]
    drawn = choose_attackers(20, fraction=0.25, seed=7)
    assert len(drawn) == 5 and drawn == choose_attackers(20, fraction=0.25, seed=7)
    assert drawn != choose_attackers(20, fraction=0.25, seed=8)
    with pytest.raises(ConfigError, match="not clients"):
        choose_attackers(4, ids=[4])


def test_label_flipping():
    labels = np.array([0, 1, 2, 1])
    assert flip_labels(labels, 3).tolist() == [2, 1, 0, 1]
    assert flip_labels(labels, 3, source=1, target=0).tolist() == [0, 0, 2, 0]


def test_backdoor_data_and_model_replacement_scaling():
    trigger = Trigger(phrase="cf mn", target_label=2)
    texts, labels = poison_classification(["good day", "bad day"], [0, 1], trigger, fraction=0.5)
    assert texts == ["good day", "bad day", "cf mn good day"] and labels == [0, 1, 2]
    # with n clients averaged and server lr 1, the scaled update replaces the global model
    global_model, malicious_model = torch.tensor([1.0, 1.0]), torch.tensor([3.0, -1.0])
    scaled = model_replacement(malicious_model - global_model, num_clients=4)
    assert torch.allclose(global_model + (scaled + 3 * torch.zeros(2)) / 4, malicious_model)


def test_byzantine_updates_by_hand():
    own = torch.tensor([1.0, -2.0])
    honest = torch.tensor([[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]])
    assert SignFlip(2.0).craft(own).tolist() == [-2.0, 4.0]
    assert IPM(0.5).craft(own, honest).tolist() == [-1.0, -1.0]
    alie = ALIE(num_clients=50, num_attackers=10).craft(own, honest)
    z = alie_z(50, 10)
    assert z == pytest.approx(0.4677, abs=1e-4)  # s = 26 - 10 = 16, Φ⁻¹(34/50)
    assert torch.allclose(alie, torch.tensor([2.0 - z * 1.0, 2.0 - z * 2.0]))
    noise = GaussianNoise(3.0).craft(torch.zeros(20000), generator=torch.Generator().manual_seed(0))
    assert float(noise.std()) == pytest.approx(3.0, rel=0.03)


def test_min_max_is_as_far_as_the_farthest_honest_pair_allows():
    honest = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    attack = MinMax()
    # max distance of mean + γp (p = −(1,1)/√2) to the honest points equals 2 at γ = √2(√7 − 1)/2
    assert attack.gamma(honest) == pytest.approx(math.sqrt(2) * (math.sqrt(7) - 1) / 2, rel=1e-4)
    crafted = attack.craft(torch.zeros(2), honest)
    assert float(torch.linalg.vector_norm(honest - crafted, dim=1).max()) == pytest.approx(2.0, rel=1e-4)
    generator = torch.Generator().manual_seed(0)
    many = torch.randn(8, 30, generator=generator) + 1.0
    crafted = attack.craft(torch.zeros(30), many)
    assert float(torch.linalg.vector_norm(many - crafted, dim=1).max()) <= float(torch.cdist(many, many).max()) * (1 + 1e-4)
    assert float(crafted @ many.mean(0)) < float(many.mean(0) @ many.mean(0))  # pushed against the mean


def test_free_riders():
    like = torch.ones(5)
    assert zero_update(like).tolist() == [0.0] * 5
    previous = torch.tensor([0.1, -0.2])
    stale = stale_update(previous, scale=2.0)
    assert stale.tolist() == pytest.approx([0.2, -0.4]) and stale.data_ptr() != previous.data_ptr()
    assert float(noise_update(torch.zeros(10000), 0.5, torch.Generator().manual_seed(0)).std()) == pytest.approx(0.5, rel=0.05)
