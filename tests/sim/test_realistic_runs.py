"""End-to-end realistic runs with real training (tiny configs): sync, FedAsync, FedBuff and
sequential with FedIT, the run directory, reproducibility, the CLI and dry runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from atoll.cli import app
from atoll.config import config_with, load_config
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides

SYSTEM = {
    "devices": {"mix": {"laptop": 1, "flagship-phone": 1}, "clients": {0: "laptop", 1: "flagship-phone"}},
    "networks": {"mix": {"wifi": 1, "ethernet": 1}},
    "availability": {"windows": "always", "dropout": {"probability": 0.0, "rejoin_minutes": 1}},
}


def system_file(tmp_path, **availability) -> Path:
    tree = json.loads(json.dumps(SYSTEM))
    tree["availability"].update(availability)
    path = tmp_path / f"sys-{len(list(tmp_path.glob('sys-*')))}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def realistic(tmp_path, folder: str, system: Path, **extra):
    values = {
        "mode": "realistic",
        "system": str(system),
        "run.dir": str(tmp_path / folder),
        "eval.local": "final",
        "run.plots": "false",
        **extra,
    }
    return config_with(tiny_overrides(tmp_path, **values))


def read_metrics(run_dir: Path) -> list[dict]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("wall_seconds", None)
        rows.append(record)
    return rows


def test_sync_fedit_run_writes_the_prototype_outputs_and_the_system_outputs(tmp_path):
    config = realistic(tmp_path, "sync", system_file(tmp_path), **{"federation.rounds": 3, "run.plots": "true"})
    run_dir, summary = start_run(config, Progress())
    path = run_dir.path
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "metrics.png",
        "label_distribution.png",
        "adapter/adapter_model.safetensors",
        "metrics_time.png",
        "timeline.png",
        "utilization.png",
        "staleness.png",
        "timeline.csv",
        "events.csv",
        "clients.csv",
        "system.json",
        "system.yaml",
    ):
        assert (path / name).is_file(), name
    records = read_metrics(path)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    times = [r["virtual_time"] for r in records]
    assert times == sorted(times) and times[-1] > 0
    assert all("accuracy" in r["global"] for r in records)
    # bytes are the serialised size of what really moved: 4 clients x the rank-8 tiny-bert adapter
    from atoll.experiment import build

    experiment = build(config)
    try:
        adapter_bytes = experiment.workbench.initial_state().nbytes()
    finally:
        experiment.close()
    assert all(r["bytes_up"] == r["bytes_down"] == 4 * adapter_bytes for r in records[1:])
    assert summary["mode"] == "realistic" and summary["stopped_by"] == "rounds" and summary["rounds_completed"] == 3
    assert summary["bytes_up_total"] == 12 * adapter_bytes
    assert "accuracy" in summary["final_global"] and "accuracy" in summary["final_local"]
    system = json.loads((path / "system.json").read_text())
    assert set(system["devices"]) == {"laptop", "flagship-phone"}
    assert system["jobs"]["delivered"] == 12 and system["staleness_histogram"] == {"0": 12}
    assert system["wall_seconds"]["train"] > 0 and 0 <= summary["event_machinery_fraction"] < 1
    with open(path / "clients.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["device"] for r in rows[:2]] == ["laptop", "flagship-phone"] and all(int(r["delivered"]) == 3 for r in rows)
    assert load_config(path / "config.yaml") == config


@pytest.mark.parametrize("paradigm", ["fedasync", "fedbuff", "sequential"])
def test_fedit_runs_asynchronously_and_sequentially(tmp_path, paradigm):
    config = realistic(
        tmp_path,
        paradigm,
        system_file(tmp_path),
        **{
            "realistic.paradigm": paradigm,
            "federation.rounds": 4,
            # concurrency and staleness weighting belong to the asynchronous paradigms and the buffer
            # to fedbuff: a paradigm refuses settings it would ignore
            **(
                {"realistic.concurrency": 3, "realistic.staleness.kind": "hinge", "realistic.staleness.a": 1.0, "realistic.staleness.b": 0}
                if paradigm != "sequential"
                else {}
            ),
            **({"realistic.fedbuff.buffer": 2} if paradigm == "fedbuff" else {}),
        },
    )
    run_dir, summary = start_run(config, Progress())
    records = read_metrics(run_dir.path)
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    assert summary["stopped_by"] == "rounds" and "accuracy" in summary["final_global"]
    system = json.loads((run_dir.path / "system.json").read_text())
    expected_updates = {"fedasync": 4, "fedbuff": 8, "sequential": 16}[paradigm]
    assert system["jobs"]["aggregated"] == expected_updates
    if paradigm != "sequential":
        assert all(len(r["staleness"]) == (2 if paradigm == "fedbuff" else 1) for r in records[1:])
    else:
        assert all(r["updates"] == 4 for r in records[1:])


def test_dropouts_lose_real_work_and_the_same_seed_replays_the_same_run(tmp_path):
    system = system_file(tmp_path, dropout={"probability": 0.4, "rejoin_minutes": 0.01})
    first, summary = start_run(realistic(tmp_path, "first", system), Progress())
    second, _ = start_run(realistic(tmp_path, "second", system), Progress())
    other, _ = start_run(realistic(tmp_path, "other", system, seed=1), Progress())
    assert summary["dropouts"] > 0 and summary["wasted"]["by_cause"]["dropout"] == summary["dropouts"]
    for name in ("timeline.csv", "events.csv", "clients.csv"):
        assert (first.path / name).read_text() == (second.path / name).read_text(), name
    assert read_metrics(first.path) == read_metrics(second.path)
    assert (first.path / "events.csv").read_text() != (other.path / "events.csv").read_text()


@pytest.fixture(scope="module")
def untargeted(tmp_path_factory, plain_bert):
    """Five evaluated rounds without a target: the per-round metrics a target is checked against
    (on the plain BERT, whose metrics move from round to round)."""
    root = tmp_path_factory.mktemp("targets")
    system = system_file(root)
    run_dir, _ = start_run(realistic(root, "untargeted", system, **{"federation.rounds": 5, "model.name": str(plain_bert)}), Progress())
    return system, str(plain_bert), read_metrics(run_dir.path)


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_a_target_ends_the_run_at_the_first_round_that_reaches_it_in_the_metrics_direction(tmp_path, untargeted, metric):
    """Accuracy is reached from below, loss from above: the target is the best value of rounds 2-5,
    which round 1 misses, so a run that compared in the wrong direction would stop at round 1."""
    system, model, records = untargeted
    values = [r["global"][metric] for r in records[1:]]
    lower_is_better = metric == "loss"
    target = min(values[1:]) if lower_is_better else max(values[1:])
    reached = [(value <= target) if lower_is_better else (value >= target) for value in values]
    assert not reached[0], f"round 1 already reaches {metric} {target}: the check would mean nothing"
    first = reached.index(True) + 1
    config = realistic(
        tmp_path,
        "target",
        system,
        **{"federation.rounds": 5, "model.name": model, "realistic.target_metric": metric, "realistic.target_value": target},
    )
    _, summary = start_run(config, Progress())
    assert summary["stopped_by"] == "target" and summary["rounds_completed"] == first, (values, target)
    assert summary["time_to_target_hours"] == pytest.approx(records[first]["virtual_hours"])


def test_a_target_no_round_reaches_lets_the_run_finish_its_rounds(tmp_path, untargeted):
    system, model, records = untargeted
    best = min(r["global"]["loss"] for r in records[1:])
    config = realistic(
        tmp_path,
        "unreached",
        system,
        **{"federation.rounds": 5, "model.name": model, "realistic.target_metric": "loss", "realistic.target_value": best / 2},
    )
    _, summary = start_run(config, Progress())
    assert summary["stopped_by"] == "rounds" and summary["rounds_completed"] == 5
    assert summary["time_to_target_hours"] is None


def test_the_cli_runs_realistic_mode_and_dry_runs_and_refuses_to_resume_them(tmp_path):
    runner = CliRunner()
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    system = system_file(tmp_path)
    args = ["run", "--quiet", str(empty)]
    for item in tiny_overrides(tmp_path / "runs", **{"run.dir": str(tmp_path / "cli")}):
        args += ["--set", item]
    result = runner.invoke(app, args + ["--set", "mode=realistic", "--set", f"system={system}"])
    assert result.exit_code == 0, result.output
    assert "realistic sync: " in result.output and (tmp_path / "cli" / "timeline.png").is_file()
    resumed = runner.invoke(app, ["run", "--resume", str(tmp_path / "cli")])
    assert resumed.exit_code == 2 and "cannot be resumed" in resumed.output
    dry_args = [a if not a.startswith("run.dir=") else f"run.dir={tmp_path / 'dry'}" for a in args]
    dry = runner.invoke(
        app, dry_args + ["--dry-run", "--set", f"system={system}", "--set", "federation.clients=500", "--set", "federation.rounds=20"]
    )
    assert dry.exit_code == 0, dry.output
    assert "realistic sync dry run" in dry.output
    summary = json.loads((tmp_path / "dry" / "summary.json").read_text())
    assert summary["dry_run"] and summary["rounds_completed"] == 20 and summary["bytes_up_total"] > 0
    assert not (tmp_path / "dry" / "adapter").exists()
