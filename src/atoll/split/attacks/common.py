"""What the inversion and label attacks share: picking the recorded messages they attack, soft
(relaxed) token inputs, and the relaxation-based optimisation that matches received activations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from atoll.split.transcript import Received, Transcript


def training_messages(transcript: "Transcript", kind: str, batches: int) -> list["Received"]:
    """The first ``batches`` recorded training messages of ``kind`` of each data party."""
    chosen: list[Received] = []
    per_party: dict[int, int] = {}
    for message in transcript.of_kind(kind):
        if kind == "forward" and message.meta.get("phase") != "train":
            continue
        if per_party.get(message.party, 0) >= batches:
            continue
        per_party[message.party] = per_party.get(message.party, 0) + 1
        chosen.append(message)
    return chosen


def matching_message(transcript: "Transcript", kind: str, party: int, step: int) -> "Received | None":
    """The recorded training message of ``kind`` of the same data party and step (forward <-> backward)."""
    for message in transcript.of_kind(kind):
        if message.party == party and message.step == step and (kind != "forward" or message.meta.get("phase") == "train"):
            return message
    return None


def freeze(model) -> None:
    """A known model used as a fixed function: evaluation mode, no parameter gradients."""
    model.train(False)
    for param in model.model.parameters():
        param.requires_grad_(False)


def twice_differentiable(model) -> None:
    """Switch a party model copy to eager attention: gradient matching differentiates a gradient,
    and PyTorch's fused CPU attention has no second derivative."""
    for config in [model.model.config, *model.configs.values()]:
        config._attn_implementation = "eager"


def soft_embeddings(logits, table, temperature: float):
    """Relaxed one-hot inputs: softmax(Z / T) · E, a convex mix of vocabulary embeddings per position."""
    import torch

    return torch.softmax(logits / temperature, dim=-1) @ table


def activation_distance(predicted, target, keep, loss: str):
    """Mean squared error (per coordinate) or mean (1 − cosine) over the real positions."""
    from torch.nn import functional as F

    if loss == "mse":
        return ((predicted - target).pow(2) * keep).sum() / (keep.sum() * target.shape[-1])
    return ((1 - F.cosine_similarity(predicted, target, dim=-1)) * keep.squeeze(-1)).sum() / keep.sum()


def relaxed_inversion(head, activations, mask, logits, steps: int, lr: float, temperature: float, loss: str = "mse"):
    """Optimise token logits Z [B, L, V] (from ``logits``) with Adam so that the known head run on
    softmax(Z/T)·E reproduces ``activations`` on the real positions; returns the optimised Z
    (Song and Raghunathan's relaxation, CCS 2020)."""
    import torch

    table = head.family.word_embeddings().weight.detach()
    keep = mask.bool().unsqueeze(-1).float()
    target = activations.detach().float()
    z = logits.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        predicted = head.run("head", soft_embeddings(z, table, temperature), mask)
        activation_distance(predicted, target, keep, loss).backward()
        optimizer.step()
    return z.detach()


def first_rows(tensor, rows: int | None):
    """The first ``rows`` examples of a batch tensor (all of them when ``rows`` is None)."""
    return tensor if rows is None else tensor[:rows]


def guesses_from_tokens(message: "Received", tokens) -> list:
    """One Guess per row of ``tokens`` (the first rows of the message's batch): the recovered token
    ids at that row's real positions."""
    from atoll.split.attacks.base import Guess

    mask = message.tensors["attention_mask"].bool()[: tokens.shape[0]]
    return [Guess(message.party, message.step, row, tokens=tokens[row][mask[row]].tolist()) for row in range(tokens.shape[0])]
