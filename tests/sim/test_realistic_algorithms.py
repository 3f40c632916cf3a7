"""Every registered algorithm runs in realistic mode (the registry is read when the tests are
collected, so algorithms added later are covered) in all four paradigms: short synchronous and
sequential runs, and short FedAsync and FedBuff runs or, when the algorithm declares
``asynchronous=False`` in its capabilities, a refusal when the config is resolved. And a cancelled straggler's private state
rolls back on a real personalized algorithm."""

from __future__ import annotations

import pytest
import yaml

from atoll import algorithms
from atoll.config import config_with
from atoll.resolve import check
from atoll.errors import ConfigError
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides

NAMES = sorted(algorithms.available())

SYSTEM = {
    "devices": {"mix": {"laptop": 1, "budget-phone": 1}},
    "networks": {"mix": {"wifi": 1, "4g": 1}},
    "availability": {"windows": "always"},
}


def overrides(tmp_path, name: str, paradigm: str) -> list[str]:
    system = tmp_path / "sys.yaml"
    system.write_text(yaml.safe_dump(SYSTEM))
    return tiny_overrides(
        tmp_path,
        **{
            "algorithm.name": name,
            "mode": "realistic",
            "system": str(system),
            "realistic.paradigm": paradigm,
            "federation.rounds": 2,
            "eval.local": "final",
            "run.dir": str(tmp_path / paradigm),
            "run.plots": "false",
            # what these runs check is the protocol (rounds, jobs, refusals), not learning
            "train.local_steps": 1,
            "data.max_examples": 300,
        },
    )


@pytest.mark.parametrize("name", NAMES)
def test_every_algorithm_runs_realistic_sync_and_async_or_refuses_async(tmp_path, name):
    _, summary = start_run(config_with(overrides(tmp_path, name, "sync")), Progress())
    assert summary["stopped_by"] == "rounds" and summary["rounds_completed"] == 2, name
    assert summary["final_global"], f"{name}: no final evaluation"
    server_cls = algorithms.get_algorithm(name)
    if not server_cls.capabilities.asynchronous:
        with pytest.raises(ConfigError, match=f"algorithm '{name}' cannot run asynchronously"):
            check(config_with(overrides(tmp_path, name, "fedasync")))
        return
    _, summary = start_run(config_with(overrides(tmp_path, name, "fedasync")), Progress())
    assert summary["stopped_by"] == "rounds" and summary["jobs"]["aggregated"] == 2, name


@pytest.mark.parametrize("name", NAMES)
def test_every_algorithm_runs_sequentially_and_buffered_or_refuses_async(tmp_path, name):
    """The other two paradigms: the adapter passed from client to client (2 hand-offs), and FedBuff
    with a buffer of 2 (2 server steps of 2 updates each) or the same refusal as FedAsync."""
    _, summary = start_run(config_with(overrides(tmp_path, name, "sequential")), Progress())
    assert summary["stopped_by"] == "rounds" and summary["rounds_completed"] == 2, name
    assert summary["final_global"], f"{name}: no final evaluation"
    buffered = overrides(tmp_path, name, "fedbuff") + ["realistic.fedbuff.buffer=2"]
    if not algorithms.get_algorithm(name).capabilities.asynchronous:
        with pytest.raises(ConfigError, match=f"algorithm '{name}' cannot run asynchronously"):
            check(config_with(buffered))
        return
    _, summary = start_run(config_with(buffered), Progress())
    assert summary["stopped_by"] == "rounds" and summary["rounds_completed"] == 2, name
    assert summary["jobs"]["aggregated"] == 4, name


def test_a_cancelled_straggler_keeps_its_private_state_from_before_the_job(tmp_path, monkeypatch):
    """K-of-N with over-selection on FedSA-LoRA (each client keeps its own B): a straggler that
    trained but was cancelled never delivered, so its stored B must be exactly what it was before
    the job. The real ModelBackend snapshots the store before training and restores on cancel;
    the check copies the snapshot at that moment, so training that mutated it in place would fail."""
    import torch

    from atoll.sim.realistic.backends import ModelBackend

    taken: dict[int, dict | None] = {}
    checked = []
    snapshot, restore = ModelBackend.snapshot, ModelBackend.restore

    def copy(state):
        return None if state is None else {k: v.clone() for k, v in state.items()}

    def recording_snapshot(self, client_id):
        value = snapshot(self, client_id)
        taken[client_id] = copy(value)
        return value

    def checking_restore(self, client_id, value):
        trained = copy(self.experiment.store.get(client_id))
        restore(self, client_id, value)
        now, before = self.experiment.store.get(client_id), taken[client_id]
        if before is None:
            assert now is None, client_id
        else:
            assert set(now) == set(before) and all(torch.equal(now[k], before[k]) for k in before), client_id
        changed = trained is not None and (before is None or any(not torch.equal(trained[k], before[k]) for k in before))
        checked.append((before is not None, changed))

    monkeypatch.setattr(ModelBackend, "snapshot", recording_snapshot)
    monkeypatch.setattr(ModelBackend, "restore", checking_restore)
    # slow devices of spread-out speeds (training, not transfer, decides who is last: only a job
    # cut while training rolls back; one cut while uploading finished training on the device),
    # 3 of 6 needed and 2 extra drawn each round: which clients lose changes from round to round,
    # so clients that already hold a B get cancelled too
    system = tmp_path / "slow.yaml"
    system.write_text(
        yaml.safe_dump(
            {
                "devices": {"mix": {"slow": 1}, "speed_sigma": 0.5, "profiles": {"slow": {"tflops": 1e-5, "memory_gb": 1}}},
                "networks": {"mix": {"ethernet": 1}},
                "availability": {"windows": "always"},
            }
        )
    )
    config = config_with(
        overrides(tmp_path, "fedsa-lora", "sync")
        + [
            f"system={system}",
            "federation.clients=6",
            "federation.sample_rate=0.5",
            "federation.rounds=8",
            "realistic.sync.wait=k_of_n",
            "realistic.sync.over_selection=0.34",
        ]
    )
    _, summary = start_run(config, Progress())
    assert summary["rounds_completed"] == 8
    assert checked and all(changed for _, changed in checked), "every cancelled straggler had trained state to roll back"
    assert any(held for held, _ in checked), "no client that already held a B was cancelled"
