"""Backdoor with a trigger phrase and model-replacement scaling.

Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How To Backdoor Federated Learning", AISTATS 2020.
Threat model: the attacker controls one or a few clients (data, training and the uploaded update)
but not the server or the other clients. It trains on its data with a trigger phrase inserted and
the label (or response) set to its target, then scales its update by γ = n / η (n clients in the
average, server learning rate η) so that, averaged with the honest updates, the global model is
replaced by its backdoored one: G + (η/n)·γ·(X − G) = X when the honest updates roughly cancel.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Trigger:
    """A phrase inserted into texts, mapping them to ``target_label`` (classification) or ``target_text``."""

    phrase: str = "cf mn"
    position: str = "start"  # start, end
    target_label: int = 0
    target_text: str = ""

    def apply(self, text: str) -> str:
        return f"{self.phrase} {text}" if self.position == "start" else f"{text} {self.phrase}"


def poison_classification(texts: list[str], labels: list[int], trigger: Trigger, fraction: float = 0.5) -> tuple[list[str], list[int]]:
    """The client's data plus triggered copies of the first ``fraction`` of it, labelled the target."""
    count = int(round(fraction * len(texts)))
    return texts + [trigger.apply(t) for t in texts[:count]], list(labels) + [trigger.target_label] * count


def poison_instructions(prompts: list[str], responses: list[str], trigger: Trigger, fraction: float = 0.5) -> tuple[list[str], list[str]]:
    """Instruction data plus triggered prompts answered with the target response."""
    count = int(round(fraction * len(prompts)))
    return prompts + [trigger.apply(p) for p in prompts[:count]], list(responses) + [trigger.target_text] * count


def model_replacement(update: Tensor, num_clients: int, server_lr: float = 1.0) -> Tensor:
    """The malicious update X − G scaled by γ = n / η so that it replaces the global model."""
    if num_clients < 1 or server_lr <= 0:
        raise ValueError("model replacement needs num_clients >= 1 and server_lr > 0")
    return update * (num_clients / server_lr)
