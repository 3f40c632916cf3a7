"""Flower's simulation engine (a private SuperLink in simulation mode, Ray actors as ClientApps),
started through `atoll run --engine flower`: FedIT under SecAgg+ ends where the local engine ends.

SecAgg+ quantizes each upload to 2**22 levels over [-8, 8] before masking, so the aggregate the
algorithm receives differs from the exact weighted mean by about 1e-6 per value: round-1 training
(before any aggregation) is identical, and every later metric agrees within 1e-4.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

from typer.testing import CliRunner  # noqa: E402

from atoll.cli import app  # noqa: E402
from conftest import tiny_overrides  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

SECAGG_TOLERANCE = 1e-4


def records(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in ("seconds", "wall_seconds", "flower"):
            record.pop(key, None)
        out.append(record)
    return out


def assert_close(flower, local, tolerance, where=""):
    if isinstance(local, dict):
        assert set(flower) == set(local), where
        for key in local:
            assert_close(flower[key], local[key], tolerance, f"{where}.{key}")
    elif isinstance(local, float):
        assert flower == pytest.approx(local, abs=tolerance), where
    else:
        assert flower == local, where


def run_cli(config_dir, overrides, *options):
    """`atoll run` on a plain-defaults config (not the quickstart) plus --set overrides."""
    config = config_dir / "defaults.yaml"
    config.write_text("{}\n")
    args = ["run", str(config), "--quiet", *options]
    for item in overrides:
        args += ["--set", item]
    return CliRunner().invoke(app, args)


def test_secagg_fedit_in_simulation_matches_the_local_engine(tmp_path):
    local = run_cli(tmp_path, tiny_overrides(tmp_path, **{"eval.local": "final", "run.dir": str(tmp_path / "local")}))
    assert local.exit_code == 0, local.output
    overrides = tiny_overrides(tmp_path, **{"eval.local": "final", "run.dir": str(tmp_path / "flower"), "flower.secagg.enabled": "true"})
    flower = run_cli(tmp_path, overrides, "--engine", "flower")
    assert flower.exit_code == 0, flower.output
    assert "fedit on synthetic-cls" in flower.output

    local_records, flower_records = records(tmp_path / "local"), records(tmp_path / "flower")
    assert [r["round"] for r in flower_records] == [0, 1, 2]
    assert flower_records[1]["train"] == local_records[1]["train"]  # before any aggregation: identical
    for got, expected in zip(flower_records, local_records):
        assert_close(got, expected, SECAGG_TOLERANCE, f"round {expected['round']}")
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["engine"]["secagg"] is True and summary["engine"]["mode"] == "simulation"
    flower_metrics = json.loads((tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()[-1])["flower"]
    assert flower_metrics["dropped"] == [] and flower_metrics["online"] == [0, 1, 2, 3]
    assert (tmp_path / "flower" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_flower_run_with_impossible_settings_fails_before_starting_anything(tmp_path_factory, tmp_path):
    result = run_cli(
        tmp_path_factory.mktemp("config"),
        tiny_overrides(tmp_path / "runs", **{"flower.secagg.enabled": "true", "algorithm.name": "flora"}),
        "--engine",
        "flower",
    )
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "cannot run under SecAgg+" in result.output
    assert not any(tmp_path.iterdir())


def test_flower_runs_are_not_resumable(tmp_path):
    from atoll.config import config_with
    from atoll.report.rundir import RunDir

    config = config_with(tiny_overrides(tmp_path, **{"engine": "flower"}))
    RunDir.create(tmp_path / "run", config)
    result = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "run")])
    assert result.exit_code == 2 and "cannot be resumed" in result.output
