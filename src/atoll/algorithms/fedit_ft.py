"""FedIT + local fine-tuning: the simplest personalization baseline (FedAvg then fine-tune, e.g.
Wang et al., "Federated Evaluation of On-device Personalization", arXiv:1910.10252, 2019; FedIT:
Zhang et al., ICASSP 2024).

Rounds are FedIT (A, B, head <- sum_k p_k x_k). Afterwards each client fine-tunes the global
adapter on its own training data for ``finetune_steps`` and keeps the result as its personal
adapter: local evaluation uses the personal adapter, global evaluation the global one. The
fine-tune is made when a client is evaluated with a global it has not fine-tuned yet (so local
metrics at an intermediate round show what stopping the federation there would give), and is
cached in the client's store with the digest of the global it started from.

Flags: ``personal`` (the fine-tuned adapter is private and used at inference);
``asynchronous`` (the federated part is FedIT); mixed ranks refused as in FedIT.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from atoll.algorithms.catalog import SPECS
from atoll.algorithms._personal import pack, state_digest, unpack
from atoll.fl.base import BaseClient, BaseServer, local_steps
from atoll.fl.state import AdapterState


class FedITFineTuneClient(BaseClient):
    def personal(self, download: AdapterState) -> AdapterState:
        """The personal adapter fine-tuned from ``download`` (made once per global, then reused)."""
        wanted = state_digest(download)
        stored = self.context.store.get(self.client_id)
        if stored is not None:
            state, digest = unpack(stored)
            if digest == wanted:
                state.base = download.base
                return state
        train = self.context.config.train
        plan = self.plan(1)
        plan = dataclasses.replace(
            plan,
            steps=self.params.finetune_steps or local_steps(train, self.context.num_examples),
            lr=self.params.finetune_lr or train.lr,
        )
        self.workbench.load(download)
        self.workbench.train(
            self.context.train_indices,
            plan,
            train.batch_size,
            rng_keys=(self.client_id, "finetune", wanted),
            group_by_length=train.group_by_length,
        )
        personal = self.workbench.read()
        self.context.store.put(self.client_id, pack(personal, wanted))
        personal.base = download.base
        return personal

    def personal_adapter(self, download: AdapterState) -> AdapterState:
        return self.personal(download)

    def evaluate(self, download: AdapterState, indices: np.ndarray | None = None) -> dict[str, float]:
        personal = self.personal(download)
        self.workbench.load(personal)
        chosen = self.context.test_indices if indices is None else indices
        return self.workbench.evaluate(chosen, max_generate=self.context.config.eval.max_generate)


class FedITFineTune(BaseServer):
    """Server: FedIT (FedAvg of every uploaded tensor, weighted by example counts)."""

    spec = SPECS["fedit-ft"]
    client_class = FedITFineTuneClient
