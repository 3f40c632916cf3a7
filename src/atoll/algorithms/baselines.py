"""Baselines that bracket federated learning: local-only (no communication) and centralized
(all clients' training data pooled in one place, the upper bound federated methods chase)."""

from __future__ import annotations

from atoll.algorithms.catalog import SPECS
from atoll.fl.capabilities import POOLED_CLIENT
from atoll.fl.base import BaseClient, BaseServer
from atoll.fl.state import AdapterState, Update


class LocalOnlyClient(BaseClient):
    """Trains its own adapter from the common initial state and never shares it."""

    def _own(self) -> AdapterState:
        stored = self.context.store.get(self.client_id)
        if stored is None:
            return self.workbench.initial_state(self.context.rank)
        return AdapterState.from_tensors(stored)

    def compose(self, round: int, download: AdapterState) -> AdapterState:
        return self._own()

    def keep(self, round: int, start: AdapterState, trained: AdapterState) -> None:
        self.context.store.put(self.client_id, trained.to_tensors())

    def upload(self, round: int, start: AdapterState, trained: AdapterState) -> AdapterState:
        return AdapterState()  # nothing leaves the device


class LocalOnly(BaseServer):
    """Each client trains alone; global accuracy is the mean of the clients' own adapters on the
    global test set (reported at the final round)."""

    spec = SPECS["local-only"]
    client_class = LocalOnlyClient

    def configure(self, round: int, client_id: int) -> AdapterState:
        return AdapterState()

    def aggregate(self, round: int, updates: list[Update]) -> None:
        return None


class Centralized(BaseServer):
    """One pooled client holds every client's training data and trains, per round, as many steps
    as the sampled clients together would (the non-private upper bound)."""

    spec = SPECS["centralized"]

    def sample(self, round: int, available: list[int]) -> list[int]:
        return [POOLED_CLIENT]

    def aggregate(self, round: int, updates: list[Update]) -> None:
        self.global_state = updates[0].state
