"""Protections as stages the federation calls at fixed points, the same in every driver.

A :class:`Stage` may act at five points of a round (every method's default does nothing):

- client side, ``training_hooks``: inside local training (example-level DP-SGD edits gradients
  through :class:`~atoll.fl.trainer.TrainHooks`, chained after the algorithm's own hooks);
- client side, ``before_upload``: after training, before the update leaves the device (clip the
  update, add local noise, mask it for secure aggregation);
- server side, ``on_receive``: when an update arrives (validate shape, dtype, finiteness, norm);
  returning a reason drops the update, which the round record lists with its client id;
- server side, ``aggregate``: in place of the algorithm's aggregation (a robust rule, or the
  unmasking sum of secure aggregation); allowed only where the algorithm's capabilities say so
  (``requires`` names them, checked when the stages are built);
- server side, ``after_aggregate``: on the new global state (noise on the sum).

Stages add numbers to the round record (``round_metrics``, e.g. the privacy spent so far), may end
the run (``stop_reason``, e.g. a privacy budget reached), in realistic mode may charge extra
upload bytes and extra message round trips to the simulated timeline, and keep what must survive a
resume in the checkpoint (``state``, e.g. the accountant's history).

Client behaviours (:class:`ClientBehaviour`) replace or wrap one client's training and upload, per
client id, from ``federation.behaviours`` in the config: how an attacking client is expressed.

The default is :class:`FiniteUpdates` alone: an update carrying NaN or Inf stops the run with a
one-line error (a diverged or hostile client), as it always has. ``federation.stages`` adds
registered stages (:data:`STAGES`) after it, in order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar

from atoll.errors import ConfigError

if TYPE_CHECKING:  # this module stays light: the resolve step reads its registries without torch
    from atoll.fl.capabilities import Capabilities
    from atoll.fl.state import AdapterState, Update
    from atoll.fl.trainer import TrainHooks


class Stage:
    """A protection; override the points it acts at (see the module docstring)."""

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()  # capability names the algorithm must declare

    # -- client side --------------------------------------------------------------------------------
    def training_hooks(self, round: int, client_id: int) -> "TrainHooks | None":
        return None

    def before_upload(self, round: int, client_id: int, update: Update, download: "AdapterState") -> Update:
        return update

    # -- server side --------------------------------------------------------------------------------
    def on_receive(self, round: int, update: Update) -> str | None:
        """A reason to drop ``update`` (None: keep it)."""
        return None

    def aggregate(self, round: int, updates: list[Update], server) -> bool:
        """Aggregate ``updates`` into ``server`` instead of the algorithm (True when it did)."""
        return False

    def after_aggregate(self, round: int, server) -> None:
        return None

    # -- run level ----------------------------------------------------------------------------------
    def round_metrics(self, round: int) -> dict[str, float]:
        return {}

    def stop_reason(self) -> str | None:
        return None

    def upload_cost(self, update: Update) -> tuple[int, int]:
        """(extra bytes, extra message round trips) this stage adds to one upload."""
        return 0, 0

    # -- checkpoints --------------------------------------------------------------------------------
    def state(self) -> dict:
        """What the stage must carry across a resume (JSON-ready; e.g. an accountant's history)."""
        return {}

    def load_state(self, state: dict) -> None:
        return None


class FiniteUpdates(Stage):
    """Refuse updates carrying NaN or Inf: the run stops with an UpdateError naming the client."""

    name = "finite"

    def on_receive(self, round: int, update: Update) -> str | None:
        from atoll.fl.state import check_finite

        check_finite(update)
        return None


class ClientBehaviour:
    """How one client trains and uploads: ``honest`` runs the algorithm's client; a behaviour may
    call it and change the result, or replace it (an attack)."""

    name: ClassVar[str] = ""

    def train(self, round: int, client_id: int, download: "AdapterState", honest: Callable[[], Update]) -> Update:
        return honest()

    def memory(self, client_id: int) -> "dict[str, AdapterState]":
        """What this behaviour keeps for ``client_id`` between the client's rounds. In one process it
        simply stays; a Flower ClientApp, which may be a new process each round, stores it in its
        node's state and hands it back through :meth:`recall` before the client's next round."""
        return {}

    def recall(self, client_id: int, memory: "dict[str, AdapterState]") -> None:
        return None


class Honest(ClientBehaviour):
    """The algorithm's own client, unchanged."""

    name = "honest"


STAGES: dict[str, type[Stage]] = {FiniteUpdates.name: FiniteUpdates}
BEHAVIOURS: dict[str, type[ClientBehaviour]] = {Honest.name: Honest}


def check_behaviours(config) -> None:
    """``federation.behaviours`` names known behaviours of existing clients and
    ``federation.stages`` known stages (ConfigError otherwise)."""
    for name in config.federation.stages:
        if name not in STAGES:
            raise ConfigError(f"federation.stages: unknown stage '{name}'", f"use one of: {', '.join(STAGES)}")
    clients = config.federation.clients
    for client_id, name in (config.federation.behaviours or {}).items():
        if not 0 <= int(client_id) < clients:
            raise ConfigError(f"federation.behaviours names client {client_id}, but clients are 0..{clients - 1}")
        if name not in BEHAVIOURS:
            raise ConfigError(
                f"federation.behaviours: client {client_id} has unknown behaviour '{name}'", f"use one of: {', '.join(BEHAVIOURS)}"
            )


class Stages:
    """The ordered stages of a run and its client behaviours; the federation calls these."""

    def __init__(self, stages: list[Stage] | None = None, behaviours: dict[int, ClientBehaviour] | None = None):
        self.stages = list(stages) if stages is not None else [FiniteUpdates()]
        self.behaviours = dict(behaviours or {})

    @classmethod
    def from_config(cls, config, capabilities: "Capabilities | None" = None) -> "Stages":
        """The default stages plus the behaviours ``federation.behaviours`` names."""
        check_behaviours(config)
        behaviours = {int(client_id): BEHAVIOURS[name]() for client_id, name in (config.federation.behaviours or {}).items()}
        stages = cls([FiniteUpdates()] + [STAGES[name]() for name in config.federation.stages], behaviours)
        if capabilities is not None:
            stages.check(capabilities)
        return stages

    def check(self, capabilities: "Capabilities") -> None:
        """Each stage's ``requires`` against the algorithm's declared capabilities."""
        for stage in self.stages:
            missing = sorted(name for name in stage.requires if not getattr(capabilities, name))
            if missing:
                raise ConfigError(f"protection '{stage.name}' needs an algorithm whose capabilities include {', '.join(missing)}")

    # -- client side ----------------------------------------------------------------------------------
    def training_hooks(self, round: int, client_id: int) -> list:
        return [hooks for stage in self.stages if (hooks := stage.training_hooks(round, client_id)) is not None]

    def train(self, round: int, client_id: int, download, honest: Callable[[], Update]) -> Update:
        behaviour = self.behaviours.get(client_id)
        update = honest() if behaviour is None else behaviour.train(round, client_id, download, honest)
        for stage in self.stages:
            update = stage.before_upload(round, client_id, update, download)
        return update

    def memory(self, client_id: int) -> dict:
        """What ``client_id``'s behaviour keeps between its rounds (see :meth:`ClientBehaviour.memory`)."""
        behaviour = self.behaviours.get(client_id)
        return behaviour.memory(client_id) if behaviour is not None else {}

    def recall(self, client_id: int, memory: dict) -> None:
        behaviour = self.behaviours.get(client_id)
        if behaviour is not None:
            behaviour.recall(client_id, memory)

    # -- server side ----------------------------------------------------------------------------------
    def on_receive(self, round: int, update: Update) -> str | None:
        for stage in self.stages:
            reason = stage.on_receive(round, update)
            if reason:
                return f"{stage.name}: {reason}"
        return None

    def aggregate(self, round: int, updates: list[Update], server) -> None:
        if not any(stage.aggregate(round, updates, server) for stage in self.stages):
            server.aggregate(round, updates)
        for stage in self.stages:
            stage.after_aggregate(round, server)

    def round_metrics(self, round: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for stage in self.stages:
            metrics.update(stage.round_metrics(round))
        return metrics

    def stop_reason(self) -> str | None:
        return next((reason for stage in self.stages if (reason := stage.stop_reason())), None)

    def state(self) -> dict:
        """Every stage's checkpoint state, by position and name (stored in a checkpoint's meta.json)."""
        return {f"{index}.{stage.name}": state for index, stage in enumerate(self.stages) if (state := stage.state())}

    def load_state(self, state: dict) -> None:
        for index, stage in enumerate(self.stages):
            if f"{index}.{stage.name}" in state:
                stage.load_state(state[f"{index}.{stage.name}"])

    def upload_cost(self, update: Update) -> tuple[int, int]:
        extra_bytes = extra_trips = 0
        for stage in self.stages:
            more_bytes, more_trips = stage.upload_cost(update)
            extra_bytes, extra_trips = extra_bytes + more_bytes, extra_trips + more_trips
        return extra_bytes, extra_trips
