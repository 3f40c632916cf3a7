"""Adversarial training against inversion: a learned mapping transforms the activations before
they are sent, and an imagined adversary, trained at the data party, tries to read the input
tokens back from them; the mapping (and the head) are trained to keep the task and defeat the
adversary (Li, Baldwin and Cohn, "Towards Robust and Privacy-preserving Text Representations",
ACL 2018; VFLAIR-LLM's AdversarialTraining with a privacy-preserving mapping).

The min-max runs in one optimizer through a gradient-reversal layer (Ganin and Lempitsky, ICML
2015): the adversary minimises its cross-entropy on the true tokens, while the gradient that
reaches the mapping is multiplied by −``weight``. ``distance`` keeps the mapped activations near
the original ones (λ·mean squared distance), which preserves the task.
"""

from __future__ import annotations

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams


class AdversarialParams(DefenseParams):
    weight: float = Field(1.0, ge=0, description="strength of the reversed adversary gradient (larger: more private)")
    distance: float = Field(0.1, ge=0, description="λ: weight of the mean squared distance between mapped and original activations")
    width: int = Field(256, gt=0, description="hidden width of the mapping and of the imagined adversary")


def reverse_gradient(tensor, scale: float):
    """Identity forward; the gradient is multiplied by −scale on the way back."""
    return tensor.detach() - scale * (tensor - tensor.detach())


class AdversarialTraining(Defense):
    name = "adversarial-training"
    paper = (
        "Li, Baldwin and Cohn, ACL 2018 (adversarial privacy-preserving representations); gradient reversal: Ganin and Lempitsky, ICML 2015"
    )
    summary = "a trained mapping on the sent activations that an imagined inversion adversary at the data party cannot read back"
    Params = AdversarialParams

    def __init__(self, params: AdversarialParams, context):
        super().__init__(params, context)
        import torch
        from torch import nn

        dim = context.hidden_size
        generator = torch.Generator().manual_seed(context.seed)
        self.mapping = nn.Sequential(nn.Linear(dim, params.width), nn.GELU(), nn.Linear(params.width, dim))
        self.adversary = nn.Sequential(nn.Linear(dim, params.width), nn.GELU(), nn.Linear(params.width, dim))
        for module in (self.mapping, self.adversary):
            for layer in (module[0], module[2]):
                nn.init.normal_(layer.weight, std=0.02, generator=generator)
                nn.init.zeros_(layer.bias)
        self.table = context.word_embeddings
        self.adversary_accuracy = 0.0

    def modules(self):
        return [self.mapping, self.adversary]

    def protect_activations(self, activations, mask, step, phase):
        return activations + self.mapping(activations)

    def extra_loss(self, exchange):
        from torch.nn import functional as F

        keep = exchange.batch["attention_mask"].bool()
        if exchange.sent.dim() != 3:
            return None
        distance = (exchange.sent - exchange.activations).pow(2)[keep].mean()
        seen = reverse_gradient(exchange.sent, self.params.weight)[keep]
        logits = F.normalize(self.adversary(seen), dim=-1) @ F.normalize(self.table, dim=-1).T / 0.05
        tokens = exchange.batch["input_ids"][keep]
        self.adversary_accuracy = float((logits.argmax(-1) == tokens).float().mean())
        return self.params.distance * distance + F.cross_entropy(logits, tokens)

    def report(self) -> dict[str, float]:
        return {"adversary_accuracy": self.adversary_accuracy}
