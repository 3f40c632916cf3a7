"""Attacking clients as federation behaviours: ``attack.kind`` for the clients of ``attack.clients``.

Threat model: an attacker controls its own clients (their data, their training and what they
upload; not the server and not the other clients). Colluding attackers share what they know. Each
attack's paper and math are in :mod:`atoll.privacy.attacks`:

- ``label-flip``: trains honestly on flipped labels;
- ``backdoor``: trains on its data plus triggered copies labelled with the target, then scales its
  change by the boost (model replacement; default: the clients aggregated per round);
- ``sign-flip``, ``gaussian``: −scale·own change; N(0, σ²) in place of it;
- ``alie``, ``ipm``, ``min-max``: crafted from the colluders' honest changes (each colluder's
  training from the same download; partial knowledge: the attackers see their own data only);
- ``free-ride-zero``, ``-noise``, ``-stale`` (Fraboni et al., AISTATS 2021): the upload's model
  part is the client's start, unchanged, plus noise, or plus the global model's last change as the
  free rider saw it (its download minus the download of its previous round: a free rider knows
  only what it is sent); none of its own training is sent (the algorithm's client still runs, for
  its own bookkeeping). That previous download is the behaviour's memory, which a Flower
  ClientApp keeps in its node's state.

Client-side protections (clipping before upload) do not bind an attacker: it controls its device.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from atoll.fl.stages import ClientBehaviour
from atoll.fl.state import AdapterState, Update
from atoll.privacy.attacks.byzantine import ALIE, IPM, GaussianNoise, MinMax, SignFlip
from atoll.privacy.messages import applied, flat_delta, model_delta, replace_model_tensors, start_of, unflat
from atoll.privacy.seams.poisoned_data import flipped, training_on, with_triggered
from atoll.seeding import numpy_rng, torch_generator


class Coalition:
    """What the attackers of one run share: the settings, the colluders, their honest changes."""

    def __init__(self, experiment, settings, attackers: list[int], aggregated: int):
        self.experiment = experiment
        self.settings = settings
        self.attackers = sorted(attackers)
        self.aggregated = aggregated  # clients whose updates one round aggregates (n of model replacement)
        self.seed = experiment.config.seed
        self._honest: dict[tuple[int, int], torch.Tensor] = {}
        self._poisoned: dict[int, tuple] = {}
        self.last_downloads: dict[int, AdapterState] = {}  # client -> the download of its previous round (free-ride-stale)

    def honest_change(self, round: int, client_id: int, download: AdapterState) -> torch.Tensor:
        """The change ``client_id`` would upload from ``download`` (trained once per round and process)."""
        key = (round, client_id)
        if key not in self._honest:
            store = self.experiment.store
            saved = store.get(client_id)
            try:
                update = self.experiment.clients[client_id].run(round, download)
            finally:
                store.put(client_id, saved) if saved is not None else store.discard(client_id)
            self._honest = {k: v for k, v in self._honest.items() if k[0] == round}
            self._honest[key] = flat_delta(update.state, self.start(client_id, download), client_id)[0]
        return self._honest[key]

    def start(self, client_id: int, download: AdapterState) -> AdapterState:
        """What ``client_id``'s change is measured from (its download, completed)."""
        return start_of(self.experiment.server.context, client_id, download)

    def poisoned_data(self, client_id: int):
        """(data, indices) the backdoor or label-flip attacker ``client_id`` trains on."""
        if client_id not in self._poisoned:
            experiment, settings = self.experiment, self.settings
            workbench, context = experiment.workbench, experiment.clients[client_id].context
            indices = context.train_indices
            if settings.kind == "label-flip":
                flip = settings.label_flip
                self._poisoned[client_id] = (
                    flipped(workbench.data, indices, experiment.spec.num_labels, flip.source, flip.target),
                    indices,
                )
            else:
                backdoor = settings.backdoor
                count = max(1, int(round(backdoor.poison_fraction * len(indices))))
                chosen = np.sort(numpy_rng(self.seed, "backdoor-copies", client_id).choice(indices, size=count, replace=False))
                trigger, target = trigger_tokens(experiment, backdoor)
                data, added = with_triggered(
                    workbench.data, chosen, trigger, target, backdoor.target_label, experiment.config.model.max_length
                )
                self._poisoned[client_id] = (data, np.concatenate([indices, added]))
        return self._poisoned[client_id]


def trigger_tokens(experiment, backdoor) -> tuple[list[int], list[int] | None]:
    """The trigger's token ids, and for generative tasks the target response's (ending in EOS)."""
    tokenizer = experiment.workbench.tokenizer
    trigger = list(tokenizer(backdoor.trigger, add_special_tokens=False)["input_ids"])
    if not experiment.spec.is_generative:
        return trigger, None
    target = list(tokenizer(backdoor.target_text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        target.append(int(tokenizer.eos_token_id))
    return trigger, target


class AttackingClient(ClientBehaviour):
    """One attacker's training and upload (see the module docstring)."""

    name = "attack"

    def __init__(self, coalition: Coalition):
        self.coalition = coalition

    def train(self, round: int, client_id: int, download: AdapterState, honest) -> Update:
        coalition = self.coalition
        kind = coalition.settings.kind
        if kind.startswith("free-ride"):
            return self.free_ride(round, client_id, download, kind, honest)
        if kind in ("label-flip", "backdoor"):
            data, indices = coalition.poisoned_data(client_id)
            with training_on(coalition.experiment.workbench, coalition.experiment.clients[client_id].context, data, indices):
                update = honest()
            if kind == "label-flip":
                return update
            boost = coalition.settings.backdoor.boost or float(coalition.aggregated)
            start = coalition.start(client_id, download)
            change, layout = flat_delta(update.state, start, client_id)
            return dataclasses.replace(update, state=applied(update.state, start, unflat(boost * change, layout)))
        update = honest()
        start = coalition.start(client_id, download)
        own, layout = flat_delta(update.state, start, client_id)
        crafted = self.craft(round, client_id, download, own)
        return dataclasses.replace(update, state=applied(update.state, start, unflat(crafted, layout)))

    def craft(self, round: int, client_id: int, download: AdapterState, own: torch.Tensor) -> torch.Tensor:
        coalition = self.coalition
        settings, kind = coalition.settings.byzantine, coalition.settings.kind
        generator = torch_generator(coalition.seed, "byzantine", client_id, round)
        if kind == "sign-flip":
            return SignFlip(settings.scale).craft(own)
        if kind == "gaussian":
            return GaussianNoise(settings.stddev).craft(own, generator=generator)
        known = []
        for colluder in coalition.attackers:
            known.append(own if colluder == client_id else coalition.honest_change(round, colluder, download))
        honest = torch.stack(known)
        if kind == "ipm":
            return IPM(settings.epsilon).craft(own, honest)
        if kind == "alie":
            return ALIE(coalition.aggregated, len(coalition.attackers), settings.z).craft(own, honest)
        return MinMax().craft(own, honest)

    def free_ride(self, round: int, client_id: int, download: AdapterState, kind: str, honest) -> Update:
        """An upload whose model part is the client's start (its download, completed), as if it
        had not trained. The algorithm's client still runs its round, so what it keeps and its
        control data (SCAFFOLD's variates) stay what the algorithm expects; none of its model
        change is sent."""
        coalition = self.coalition
        update = honest()
        start = coalition.start(client_id, download).model_tensors()
        message = replace_model_tensors(update.state, {key: start[key] for key in update.state.model_tensors()})
        if kind == "free-ride-noise":
            generator = torch_generator(coalition.seed, "free-ride", client_id, round)
            change = {k: torch.normal(0.0, coalition.settings.byzantine.stddev, t.shape, generator=generator, dtype=torch.float64)
                      for k, t in message.model_tensors().items()}  # fmt: skip
            message = applied(message, message, change)
        elif kind == "free-ride-stale":
            previous = coalition.last_downloads.get(client_id)
            if previous is not None and previous.model_tensors().keys() == download.model_tensors().keys():
                message = applied(message, message, model_delta(download, previous, client_id))  # the global model's last change
            coalition.last_downloads[client_id] = download.clone()
        return Update(client_id, update.num_examples, message, {})

    def memory(self, client_id: int) -> dict[str, AdapterState]:
        previous = self.coalition.last_downloads.get(client_id)
        return {"last-download": previous} if previous is not None else {}

    def recall(self, client_id: int, memory: dict[str, AdapterState]) -> None:
        if "last-download" in memory:
            self.coalition.last_downloads[client_id] = memory["last-download"]
        else:
            self.coalition.last_downloads.pop(client_id, None)
