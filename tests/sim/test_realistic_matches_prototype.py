"""Realistic mode reduces to the prototype runner: always-online identical devices, synchronous
rounds that wait for every client, and sample rate 1 give exactly the prototype's metrics for the
same seed, round by round, for algorithms with plain, personal and control-variate state."""

from __future__ import annotations

import pytest
import yaml

from atoll.config import config_with
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides
from helpers import assert_same_length, read_records, read_summary, task_view

# identical laptops on ethernet, always online, no dropout, no speed spread (the defaults, spelled out)
IDENTICAL_DEVICES = {
    "devices": {"mix": {"laptop": 1}, "speed_sigma": 0.0},
    "networks": {"mix": {"ethernet": 1}},
    "availability": {"windows": "always", "dropout": {"probability": 0.0, "rejoin_minutes": 1}},
}

# FedIT (the mean), SCAFFOLD (control variates in the client store and on the server), FedSA-LoRA
# (a private B per client, no global model), FLoRA (a dense merged downlink), HetLoRA (mixed ranks)
CASES = {
    "fedit": {},
    "scaffold": {},
    "fedsa-lora": {},
    "flora": {},
    "hetlora": {"model.lora.rank_cycle": "[4, 8]"},
}


@pytest.mark.parametrize("name", list(CASES))
def test_sync_realistic_run_on_identical_always_online_devices_gives_the_prototype_metrics(tmp_path, reference_runs, name):
    extra = {"algorithm.name": name, "federation.rounds": 2, "federation.sample_rate": 1.0, "eval.local": "always", **CASES[name]}
    prototype = reference_runs.get(**extra)
    system = tmp_path / "identical.yaml"
    system.write_text(yaml.safe_dump(IDENTICAL_DEVICES))
    realistic = {"mode": "realistic", "system": str(system), "realistic.paradigm": "sync", "realistic.sync.wait": "all"}
    run_dir, summary = start_run(
        config_with(tiny_overrides(tmp_path, **extra, **realistic, **{"run.dir": str(tmp_path / "realistic"), "run.plots": "false"})),
        Progress(),
    )
    expected, got = read_records(prototype), read_records(run_dir.path)
    assert_same_length(got, expected, "metrics records")
    for mine, theirs in zip(got, expected, strict=True):
        assert task_view(mine) == task_view(theirs), f"{name} round {theirs['round']}"
        if mine["round"] > 0:
            assert mine["aggregated"] == mine["clients"] == list(range(4)), "every client delivered"
    reference = read_summary(prototype)
    for key in ("final_global", "final_local", "bytes_up_total", "bytes_down_total", "majority_class_rate", "trainable_parameters"):
        assert summary[key] == reference[key], key
    assert summary["stopped_by"] == "rounds" and summary["wasted"]["jobs"] == 0
