"""FFA-LoRA: federated LoRA with the down-projection A frozen (Sun et al., "Improving LoRA in
Privacy-preserving Federated Learning", ICLR 2024).

A stays at the shared seeded initialisation A0 for the whole run; clients train only B (and the
classifier head). Server: B <- sum_k p_k B_k, head <- sum_k p_k head_k, p_k = n_k / sum n.
Because every client multiplies the same A0, aggregation is exact:
    s * (sum_k p_k B_k) A0 = sum_k p_k s B_k A0.
Only B and the head travel, both ways: every client rebuilds A0 from the shared seed.

mixed_ranks "refuse": one frozen A0 of one rank is the method. asynchronous: with A
fixed, mixing one client's B into the global B at a time stays exact.
"""

from __future__ import annotations

from atoll.algorithms.catalog import SPECS
from atoll.fl.base import BaseClient, BaseServer, average_states
from atoll.fl.state import AdapterState, Update, example_weights
from atoll.fl.workbench import Trainable


class FFALoRAClient(BaseClient):
    def compose(self, round: int, download: AdapterState) -> AdapterState:
        # A0 is the seeded initial A of the global rank: identical in every process with the same seed
        return download.completed(self.workbench.initial_state(download.rank()), "A")

    def trainable(self, round: int) -> Trainable:
        return Trainable(lora_A=False)

    def upload(self, round: int, start: AdapterState, trained: AdapterState) -> AdapterState:
        return trained.without("A")


class FFALoRA(BaseServer):
    spec = SPECS["ffa-lora"]
    client_class = FFALoRAClient

    def configure(self, round: int, client_id: int) -> AdapterState:
        return self.global_state.without("A")

    def aggregate(self, round: int, updates: list[Update]) -> None:
        if not updates:
            return
        # A is never averaged: it stays the server's own A0, bit for bit
        self.global_state = average_states([u.state for u in updates], example_weights(updates), lora_A=False, base=self.global_state)
