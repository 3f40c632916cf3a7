"""FedSA-LoRA: share A, keep B personal (Guo et al., "Selective Aggregation for Low-Rank
Adaptation in Federated Learning", ICLR 2025).

A learns what clients have in common, B what is particular to each. Client k runs
W0 + s * B_k A_bar: it downloads A_bar, trains A and its own B_k, uploads A_k only and keeps B_k
in its private store for its next round (B_k starts at PEFT's zero init). Server:
A_bar <- sum_k p_k A_k. The server never receives, holds or changes any B_k.

The classifier head is shared (FedAvg) by default: the method's claim is about A and B, and a
shared head keeps personalisation attributable to B alone. ``share_head: false`` keeps the head
personal too (stored beside B_k, never uploaded).

There is no global model (the server has no B): global accuracy is the mean of the clients'
personal adapters on the global test set; local accuracy uses each client's own B_k.
mixed_ranks "refuse": A_bar is one tensor of one rank. asynchronous: averaging the
shared A is plain FedAvg on one factor and can take one update at a time.
"""

from __future__ import annotations

from torch import Tensor

from atoll.algorithms.catalog import FedSALoRAParams, SPECS
from atoll.fl.base import BaseClient, BaseServer, average_states
from atoll.fl.state import AdapterState, LoRAFactors, Update, example_weights


class FedSALoRAClient(BaseClient):
    params: FedSALoRAParams

    def _private(self, rank: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """This client's B_k per module (and its head when personal): from its own store entry,
        else PEFT's initial ones. Never from the live model, which may hold another client's."""
        initial = self.workbench.initial_state(rank)
        stored = self.context.store.get(self.client_id)
        if stored is None:
            return {n: f.B.clone() for n, f in initial.lora.items()}, {n: t.clone() for n, t in initial.extra.items()}
        B = {n: stored[f"B.{n}"].clone() for n in initial.lora}
        head = {n: stored[f"extra.{n}"].clone() for n in initial.extra if f"extra.{n}" in stored}
        return B, head

    def compose(self, round: int, download: AdapterState) -> AdapterState:
        B, head = self._private(download.rank())
        lora = {name: LoRAFactors(f.A.clone(), B[name], f.scale) for name, f in download.lora.items()}
        extra = {name: t.clone() for name, t in download.extra.items()}
        if not self.params.share_head:
            extra.update(head)
        return AdapterState(lora, extra)

    def keep(self, round: int, start: AdapterState, trained: AdapterState) -> None:
        tensors = {f"B.{name}": f.B for name, f in trained.lora.items()}
        if not self.params.share_head:
            tensors.update({f"extra.{name}": t for name, t in trained.extra.items()})
        self.context.store.put(self.client_id, tensors)

    def upload(self, round: int, start: AdapterState, trained: AdapterState) -> AdapterState:
        return trained.without("B", extra=self.params.share_head)


class FedSALoRA(BaseServer):
    spec = SPECS["fedsa-lora"]
    client_class = FedSALoRAClient

    def __init__(self, context, params):
        super().__init__(context, params)
        # the server holds A_bar (and the shared head) only; B never exists here
        self.global_state = self.global_state.without("B", extra=params.share_head)

    def aggregate(self, round: int, updates: list[Update]) -> None:
        if not updates:
            return
        self.global_state = average_states(
            [u.state for u in updates],
            example_weights(updates),
            lora_B=False,
            extra=self.params.share_head,
            base=self.global_state,
        )
