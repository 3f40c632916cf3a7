"""The declaration types of an algorithm: its capabilities and its spec (see
:mod:`atoll.algorithms.catalog` for every algorithm's entry). Light: pydantic and dataclasses only,
so config checks and ``atoll list`` never import torch."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from pydantic import BaseModel, ConfigDict


POOLED_CLIENT = -1  # the client id of a pooled-data algorithm's one client (it holds every client's data)


@dataclass(frozen=True)
class Capabilities:
    """What an algorithm supports. One compatibility check (:mod:`atoll.compat`) reads these for
    every engine and paradigm; the defaults describe a synchronous, single-rank, global-model
    method whose aggregation is not a plain weighted mean.

    - ``mixed_ranks``: "native" (different client ranks are part of the method), "pad"
      (zero-padding, documented), or "refuse" (mixed ranks are a config error);
    - ``asynchronous``: it has a rule for one update at a time (FedAsync) and for buffers (FedBuff);
    - ``async_mixed_ranks``: that asynchronous rule also takes updates of different ranks;
    - ``weighted_mean``: aggregate(updates) == aggregate([one update holding their
      example-weighted mean]), so secure aggregation (which reveals only the sum) and central DP
      (noise on the sum) can stand in for the individual updates;
    - ``personal``: clients keep private state that their own model uses at inference;
    - ``personal_export``: that personal model is one LoRA adapter (``run.export_personal``);
    - ``client_state``: its clients keep private state between rounds (in the ClientStore: a
      personal adapter, control variates), so only the client's own process can train as it would;
    - ``global_model``: the server holds a model worth evaluating on the global test set;
    - ``pooled_data``: it pools every client's data in one place (not federated; a baseline).
    """

    mixed_ranks: Literal["native", "pad", "refuse"] = "refuse"
    asynchronous: bool = False
    async_mixed_ranks: bool = False
    weighted_mean: bool = False
    personal: bool = False
    personal_export: bool = False
    client_state: bool = False
    global_model: bool = True
    pooled_data: bool = False

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class NoParams(BaseModel):
    """An algorithm without parameters of its own."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm's declaration: ``module`` (under atoll.algorithms) defines ``server_class``."""

    name: str
    module: str
    server_class: str
    paper: str
    Params: type[BaseModel]
    capabilities: Capabilities
