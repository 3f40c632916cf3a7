"""A backdoor with model replacement succeeds against plain FedAvg and is weakened by norm bounding.

The small case: a bag-of-words softmax classifier (20 words, 2 classes) trained by 10 clients
with full-batch gradient descent; client 0 is the attacker. Its data adds a trigger word that
never occurs in honest data, labelled class 0; after 5 honest rounds it sends its update scaled
by n (model replacement) once. Attack success rate: triggered class-1 inputs classified 0.
"""

from __future__ import annotations

import torch

from atoll.privacy.attacks.backdoor import model_replacement
from atoll.privacy.dp.clipping import l2_norm
from atoll.privacy.robust.norm_bounding import norm_bounded_mean

WORDS, CLASSES, TRIGGER, CLIENTS = 20, 2, 19, 10


def make_data(generator: torch.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    features = torch.zeros(count, WORDS)
    for row, label in enumerate(labels.tolist()):
        words = torch.randint(0, 9, (4,), generator=generator) + 9 * label  # class words 0-8 or 9-17
        features[row, words] = 1.0
        features[row, 18] = 1.0  # a common word
    return features, labels


def local_update(weights: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, steps: int = 20, lr: float = 0.5) -> torch.Tensor:
    local = weights.clone().requires_grad_(True)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(features @ local.view(WORDS, CLASSES), labels)
        (grad,) = torch.autograd.grad(loss, local)
        local = (local - lr * grad).detach().requires_grad_(True)
    return local.detach() - weights


def attack_success(weights: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    triggered = features[labels == 1].clone()
    triggered[:, TRIGGER] = 1.0
    return float(((triggered @ weights.view(WORDS, CLASSES)).argmax(1) == 0).float().mean())


def clean_accuracy(weights: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float(((features @ weights.view(WORDS, CLASSES)).argmax(1) == labels).float().mean())


def run(defense: str) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)
    clients = [make_data(generator, 40) for _ in range(CLIENTS)]
    test = make_data(generator, 400)
    features, labels = clients[0]
    poisoned = features[labels == 1].clone()
    poisoned[:, TRIGGER] = 1.0
    attacker_data = (torch.cat([features, poisoned, poisoned]), torch.cat([labels, torch.zeros(2 * len(poisoned), dtype=torch.long)]))
    weights = torch.zeros(WORDS * CLASSES)
    honest_norms: list[float] = []
    for round_index in range(6):
        updates = [local_update(weights, *data) for data in clients]
        honest_norms = [l2_norm(u) for u in updates[1:]]
        if round_index == 5:
            updates[0] = model_replacement(local_update(weights, *attacker_data, steps=60), CLIENTS)
        stacked = torch.stack(updates)
        if defense == "none":
            weights = weights + stacked.mean(0)
        else:
            bound = sorted(honest_norms)[len(honest_norms) // 2]  # the server's estimate: median update norm
            weights = weights + norm_bounded_mean(stacked, bound)
    return attack_success(weights, *test), clean_accuracy(weights, *test)


def test_backdoor_succeeds_without_protection_and_norm_bounding_weakens_it():
    asr_plain, accuracy_plain = run("none")
    asr_bounded, accuracy_bounded = run("norm_bounding")
    assert asr_plain > 0.9
    assert asr_bounded < 0.5 * asr_plain
    assert accuracy_bounded > 0.9  # the main task survives the defense
