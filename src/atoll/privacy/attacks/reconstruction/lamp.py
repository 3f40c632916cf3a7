"""LAMP-style reconstruction of a client's text by gradient matching, for a causal LM with LoRA.

Balunović, Dimitrov, Jovanović, Vechev, "LAMP: Extracting Text from Gradients with Language Model
Priors", NeurIPS 2022. LAMP alternates (i) continuous optimisation of a relaxed input so that its
gradient matches the observed one under cosine distance, and (ii) discrete steps that propose token
changes and keep those that lower the gradient distance (plus, optionally, a language-model prior).

For a causal LM the training labels are the inputs themselves, so the relaxation here is over
token distributions: logits Z (L x V) give P = softmax(Z), inputs P·W_emb, and soft next-token
targets P; the distance is 1 − cos(∇θ ℓ(P), g) over all LoRA parameters θ. The discrete phase starts
from argmax P and tries, per position, the top alternatives of P and swaps of neighbours, scoring
each candidate by the exact gradient distance of its real tokens (LAMP's L_rec), plus ``prior_weight``
times the model's own mean next-token loss (the LM prior; off by default since a small model's
prior is weak). Threat model: an honest-but-curious server that knows the weights it sent, the
sequence length and the first (BOS) token, and sees one client's gradient or one-step update.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LampPlan:
    steps: int = 300
    lr: float = 0.1
    alternatives: int = 4
    sweeps: int = 2
    prior_weight: float = 0.0
    seed: int = 0


def _gradient_distance(grads: list[Tensor], observed: list[Tensor]) -> Tensor:
    flat = torch.cat([g.reshape(-1) for g in grads])
    target = torch.cat([o.reshape(-1) for o in observed]).to(flat.dtype)
    return 1.0 - torch.nn.functional.cosine_similarity(flat, target, dim=0)


class LampAttack:
    """Reconstructs one sequence of known length from the gradient of ``param_names``."""

    def __init__(self, model: nn.Module, param_names: list[str], observed: dict[str, Tensor], plan: LampPlan = LampPlan()):
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", "eager")
        if implementation not in (None, "eager"):
            raise ValueError(
                f"LAMP differentiates through gradients, which '{implementation}' attention cannot; "
                "call model.set_attn_implementation('eager') first"
            )
        self.model = model
        params = dict(model.named_parameters())
        self.params = [params[name] for name in param_names]
        self.observed = [observed[name].detach().float() for name in param_names]
        self.plan = plan
        self.embedding = model.get_input_embeddings().weight.detach()

    def _soft_loss(self, distribution: Tensor) -> Tensor:
        embeds = (distribution @ self.embedding)[None]
        logits = self.model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits[0].float()
        return -(distribution[1:] * torch.log_softmax(logits[:-1], dim=-1)).sum(-1).mean()

    def token_loss(self, tokens: list[int]) -> Tensor:
        ids = torch.tensor([tokens])
        logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
        return nn.functional.cross_entropy(logits[:-1], ids[0, 1:])

    def distance(self, tokens: list[int]) -> float:
        """The exact L_rec of a token sequence (plus the LM prior when weighted)."""
        loss = self.token_loss(tokens)
        grads = torch.autograd.grad(loss, self.params)
        score = float(_gradient_distance(list(grads), self.observed))
        return score + self.plan.prior_weight * float(loss.detach())

    def continuous(self, length: int, first_token: int) -> Tensor:
        """Token distributions (length x V) whose soft gradient matches the observed one."""
        generator = torch.Generator().manual_seed(self.plan.seed)
        vocab = self.embedding.shape[0]
        logits = torch.randn(length, vocab, generator=generator).requires_grad_(True)
        fixed = torch.nn.functional.one_hot(torch.tensor(first_token), vocab).float()[None]
        optimizer = torch.optim.Adam([logits], lr=self.plan.lr)
        for _ in range(self.plan.steps):
            distribution = torch.cat([fixed, torch.softmax(logits[1:], dim=-1)])
            grads = torch.autograd.grad(self._soft_loss(distribution), self.params, create_graph=True)
            loss = _gradient_distance(list(grads), self.observed)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return torch.cat([fixed, torch.softmax(logits[1:].detach(), dim=-1)])

    def reconstruct(self, length: int, first_token: int) -> list[int]:
        distribution = self.continuous(length, first_token)
        tokens = distribution.argmax(-1).tolist()
        best = self.distance(tokens)
        options = distribution.topk(self.plan.alternatives, dim=-1).indices.tolist()
        for _ in range(self.plan.sweeps):
            improved = False
            for position in range(1, length):
                for token in options[position]:
                    if token == tokens[position]:
                        continue
                    trial = tokens[:position] + [token] + tokens[position + 1 :]
                    score = self.distance(trial)
                    if score < best:
                        tokens, best, improved = trial, score, True
                if position + 1 < length:
                    trial = tokens[:position] + [tokens[position + 1], tokens[position]] + tokens[position + 2 :]
                    score = self.distance(trial)
                    if score < best:
                        tokens, best, improved = trial, score, True
            if not improved:
                break
        return tokens
