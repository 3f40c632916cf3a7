"""The attack seam: the model party is honest but curious. It follows the protocol, and afterwards
tries to recover the data party's inputs or labels from what it actually received (its
:class:`~atoll.split.transcript.Transcript`) plus the knowledge its config states, nothing else.

An attack:

- declares ``target`` ("inputs" or "labels") and its parameters (``Params``), which include its
  knowledge: e.g. ``head: pretrained`` (the public pretrained head's weights) or ``head: trained``
  (the data party's trained head, a stronger white-box assumption), ``auxiliary: 100``
  (examples from the same distribution, drawn from the held-out pool);
- implements ``run(transcript, knowledge) -> list[Guess]``: one guess per attacked example,
  keyed by (data party, step, row of the batch) as the message's meta says;
- is scored by the harness (:mod:`atoll.split.attacks.harness`), which alone knows the truth:
  token precision/recall, ROUGE-L and position accuracy for inputs; recovery rate and AUC for
  labels (:mod:`atoll.split.attacks.metrics`).

Module rule, as for defenses: import torch inside functions, so that checking a config stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from atoll.split.slices import PartyModel
    from atoll.split.transcript import Transcript


class AttackParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Guess:
    """What the attacker claims about one example of one received batch."""

    party: int
    step: int
    row: int
    tokens: list[int] | None = None  # inputs: the recovered token ids of the real positions
    label: int | None = None  # labels: the recovered class (or token)
    score: float | None = None  # labels: a score that ranks positives above negatives (for AUC)


@dataclass
class Knowledge:
    """The attacker's side knowledge, handed out only when its config asks for it.

    ``data_model(which, party)`` returns a white-box copy of a data party's slices, its head and
    in head-body-tail its tail ("pretrained": the public base weights; "trained": the party's
    slices at the end of training);
    ``auxiliary(count)`` returns batches of same-distribution examples the parties did not train on;
    ``special_ids`` are the tokenizer's special token ids (public);
    ``own_model()`` is the model party's own slice as it builds it (public base weights, its
    configured LoRA initialisation); attacks load into it the parameters the model party had at
    a recorded step (``Received.local["parameters.<name>"]``, recorded when an attack declares
    ``needs_parameters``)."""

    data_model: Callable[[str, int], "PartyModel"]
    auxiliary: Callable[[int], list[dict[str, Any]]]
    vocab_size: int
    special_ids: tuple[int, ...] = ()
    used: list[str] | None = None
    own_model: Callable[[], "PartyModel"] | None = None


class Attack:
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    target: ClassVar[str] = "inputs"
    Params: ClassVar[type[AttackParams]] = AttackParams
    needs_parameters: ClassVar[bool] = False  # the model party records its own parameters at each recorded step

    def __init__(self, params: AttackParams, seed: int):
        self.params = params
        self.seed = seed

    @classmethod
    def check(cls, params: AttackParams, partition: str, head_kind: str) -> None:
        """Raise a ConfigError before training when the attack cannot run on this cut and task."""

    def positive_label(self) -> int | None:
        """Label attacks with scores: the class whose examples count as positives for the AUC
        (None: a binary task's class 1)."""
        return None

    def run(self, transcript: "Transcript", knowledge: Knowledge) -> list[Guess]:
        raise NotImplementedError
