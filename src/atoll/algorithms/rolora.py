"""RoLoRA: alternating optimisation of the LoRA factors (Chen et al., "Robust Federated
Finetuning of LLMs via Alternating Optimization of LoRA", NeurIPS 2025).

Rounds alternate which factor is trained. In a B-round every client starts from the global
(A, B), trains B with A frozen and uploads B; the server sets B <- sum_k p_k B_k and keeps A.
In an A-round the roles swap. The head is trained and averaged every round. Since the frozen
factor is one shared tensor within a round, aggregation is exact in every round:
    s * B_bar A = sum_k p_k s B_k A  (B-round),   s * B Abar = sum_k p_k s B A_k  (A-round).
Uploads carry the trained factor only; downloads carry both (a client keeps no model copy).

mixed_ranks "refuse": the frozen factor must be one shared tensor. not asynchronous: an
update trained in an earlier round may have trained the other factor, or against a frozen factor
the server has since replaced, and mixing it in would break exactness.
"""

from __future__ import annotations


from atoll.algorithms.catalog import RoLoRAParams, SPECS
from atoll.fl.base import BaseClient, BaseServer, average_states
from atoll.fl.state import AdapterState, Update, example_weights
from atoll.fl.workbench import Trainable


def trained_factor(round: int, params: RoLoRAParams) -> str:
    """'A' or 'B': the factor trained in ``round`` (1-based)."""
    other = "A" if params.first_factor == "B" else "B"
    return params.first_factor if round % 2 == 1 else other


def frozen_factor(round: int, params: RoLoRAParams) -> str:
    return "A" if trained_factor(round, params) == "B" else "B"


class RoLoRAClient(BaseClient):
    params: RoLoRAParams

    def trainable(self, round: int) -> Trainable:
        factor = trained_factor(round, self.params)
        return Trainable(lora_A=factor == "A", lora_B=factor == "B")

    def upload(self, round: int, start: AdapterState, trained: AdapterState) -> AdapterState:
        return trained.without(frozen_factor(round, self.params))


class RoLoRA(BaseServer):
    spec = SPECS["rolora"]
    client_class = RoLoRAClient

    def aggregate(self, round: int, updates: list[Update]) -> None:
        if not updates:
            return
        factor = trained_factor(round, self.params)
        self.global_state = average_states(
            [u.state for u in updates],
            example_weights(updates),
            lora_A=factor == "A",
            lora_B=factor == "B",
            base=self.global_state,
        )
