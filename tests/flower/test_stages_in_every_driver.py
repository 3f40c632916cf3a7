"""The protection seam: a stage and a client behaviour named in the config act at the same
points in the synchronous loop, the event simulation and Flower (ServerApp and ClientApps, here
in one process), and what they add reaches each driver's round records."""

from __future__ import annotations

import json

import pytest
import torch

from atoll.config import config_with
from atoll.dispatch import start_run
from atoll.errors import ConfigError
from atoll.fl import stages as stage_registry
from atoll.fl.stages import ClientBehaviour, Stage
from atoll.report.progress import Progress
from atoll.resolve import check
from conftest import tiny_overrides
from test_every_algorithm import run_on_flower

CALLS: list[tuple[str, int, int]] = []


class MarkAndDrop(Stage):
    """Client side: adds 1 to every uploaded head tensor. Server side: drops client 1's update,
    counts what it keeps, and checks that every kept update carries the client-side mark."""

    name = "mark-and-drop"

    def before_upload(self, round, client_id, update, download):
        CALLS.append(("before_upload", round, client_id))
        update.state.extra = {key: tensor + 1.0 for key, tensor in update.state.extra.items()}
        update.metrics["marked"] = 1.0
        return update

    def on_receive(self, round, update):
        CALLS.append(("on_receive", round, update.client_id))
        assert update.metrics.get("marked") == 1.0 or update.client_id < 0, "the client-side stage did not run before upload"
        return "client 1 is not trusted" if update.client_id == 1 else None

    def after_aggregate(self, round, server):
        CALLS.append(("after_aggregate", round, -1))

    def round_metrics(self, round):
        return {"kept": float(sum(1 for kind, r, c in CALLS if kind == "on_receive" and r == round and c != 1))}


class Silent(ClientBehaviour):
    """A client that trains honestly but uploads its download back (an attack's simplest shape)."""

    name = "silent"

    def train(self, round, client_id, download, honest):
        update = honest()
        update.state = download.clone()
        return update


class NeedsMean(Stage):
    name = "needs-mean"
    requires = frozenset({"weighted_mean"})


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(stage_registry.STAGES, MarkAndDrop.name, MarkAndDrop)
    monkeypatch.setitem(stage_registry.STAGES, NeedsMean.name, NeedsMean)
    monkeypatch.setitem(stage_registry.BEHAVIOURS, Silent.name, Silent)
    CALLS.clear()
    yield
    CALLS.clear()


SETTINGS = {"federation.stages": "[mark-and-drop]", "federation.behaviours": "{2: silent}", "eval.local": "never"}


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_seam_ran(run_dir, rounds: int):
    for round in range(1, rounds + 1):
        uploads = sorted(c for kind, r, c in CALLS if kind == "before_upload" and r == round)
        received = sorted(c for kind, r, c in CALLS if kind == "on_receive" and r == round)
        assert uploads == received == [0, 1, 2, 3], (round, uploads, received)
        assert ("after_aggregate", round, -1) in CALLS
    trained = [r for r in records(run_dir) if r["round"] > 0]
    assert len(trained) == rounds
    for record in trained:
        assert record["dropped_updates"] == [{"client": 1, "reason": "mark-and-drop: client 1 is not trusted"}]
        assert record["protection"] == {"kept": 3.0}


def test_the_synchronous_loop_calls_every_stage(tmp_path, registered):
    run_dir, _ = start_run(config_with(tiny_overrides(tmp_path, **SETTINGS)), Progress())
    assert_seam_ran(run_dir.path, 2)


def test_the_event_simulation_calls_every_stage(tmp_path, registered):
    system = tmp_path / "sys.yaml"
    system.write_text("devices: {mix: {laptop: 1}}\nnetworks: {mix: {ethernet: 1}}\n")
    settings = {**SETTINGS, "mode": "realistic", "system": str(system)}
    run_dir, _ = start_run(config_with(tiny_overrides(tmp_path, **settings)), Progress())
    assert_seam_ran(run_dir.path, 2)


@pytest.mark.usefixtures("flower_isolation")
def test_flower_calls_every_stage_on_both_sides(tmp_path, registered):
    config = config_with(tiny_overrides(tmp_path, **SETTINGS, **{"engine": "flower"}))
    run_on_flower(config, tmp_path / "flower")
    assert_seam_ran(tmp_path / "flower", 2)


def test_the_silent_behaviour_replaces_one_clients_upload(tmp_path, registered):
    """Client 2 uploads its download unchanged (plus the stage's +1 mark), the others their training."""
    from atoll.experiment import build
    from atoll.fl.federation import Federation

    experiment = build(config_with(tiny_overrides(tmp_path, **SETTINGS)))
    try:
        federation = Federation(experiment)
        download = federation.configure(1, 2)
        silent = federation.train(1, 2, download)
        honest = federation.train(1, 0, federation.configure(1, 0))
        for name, factors in silent.state.lora.items():
            assert torch.equal(factors.A, download.lora[name].A) and torch.equal(factors.B, download.lora[name].B)
        for key, tensor in silent.state.extra.items():
            assert torch.equal(tensor, download.extra[key] + 1.0)
        assert any(not torch.equal(f.B, download.lora[n].B) for n, f in honest.state.lora.items())
    finally:
        experiment.close()


def test_a_stage_is_refused_where_the_algorithm_lacks_what_it_requires(tmp_path, registered):
    check(config_with(tiny_overrides(tmp_path, **{"federation.stages": "[needs-mean]", "algorithm.name": "fedit"})))
    with pytest.raises(ConfigError, match="needs an algorithm whose capabilities include weighted_mean"):
        check(config_with(tiny_overrides(tmp_path, **{"federation.stages": "[needs-mean]", "algorithm.name": "flexlora"})))
    with pytest.raises(ConfigError, match="unknown stage"):
        check(config_with(tiny_overrides(tmp_path, **{"federation.stages": "[nope]"})))
    with pytest.raises(ConfigError, match="unknown behaviour"):
        check(config_with(tiny_overrides(tmp_path, **{"federation.behaviours": "{0: nope}"})))
