"""Norm-based label scoring: the per-example norm of the gradient the data party returns ranks the
examples of the rare (positive) class above the others, because the model, leaning toward the
common class, is more wrong on them (Li, Sun, Wang, Yin, Chen and others, "Label Leakage and
Protection in Two-party Split Learning", ICLR 2022; VFLAIR-LLM's NormbasedScoring).

For every recorded training backward message, each example's score is the L2 norm of its share
of ``output_gradients`` (class-logit gradients in head-tail, hidden-state gradients in
head-body-tail). Scored by AUC for "label == ``positive_class``"; the attacker's stated knowledge
is which class is the rare one. On a multi-class task this is one class against the rest.
"""

from __future__ import annotations

from pydantic import Field

from atoll.split.attacks.base import Attack, AttackParams, Guess, Knowledge
from atoll.split.attacks.common import training_messages


class NormScoringParams(AttackParams):
    positive_class: int = Field(1, ge=0, description="knowledge: the rare class the attacker scores (AUC of label == positive_class)")
    batches: int = Field(8, gt=0, description="attack at most this many recorded training batches per data party")


class NormScoring(Attack):
    name = "norm-scoring"
    paper = "Li et al., Label Leakage and Protection in Two-party Split Learning, ICLR 2022"
    summary = "score each example by the norm of its returned gradient: the rare class has larger norms"
    target = "labels"
    Params = NormScoringParams

    @classmethod
    def check(cls, params, partition: str, head_kind: str) -> None:
        from atoll.errors import ConfigError

        if head_kind != "classification":
            raise ConfigError("attack norm-scoring needs a classification task", "remove it or use a classification data source")

    def positive_label(self) -> int:
        return self.params.positive_class

    def run(self, transcript, knowledge: Knowledge) -> list[Guess]:
        guesses: list[Guess] = []
        for message in training_messages(transcript, "backward", self.params.batches):
            gradients = message.tensors["output_gradients"].float()
            norms = gradients.reshape(gradients.shape[0], -1).norm(dim=-1)
            for row, value in enumerate(norms.tolist()):
                guesses.append(Guess(message.party, message.step, row, score=value))
        return guesses
