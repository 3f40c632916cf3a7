"""Flower's simulation engine (a private SuperLink in simulation mode, Ray actors as ClientApps),
started through `atoll run --engine flower`, against the local engine's reference run:

- FedIT under SecAgg+: SecAgg+ quantizes each upload to 2**22 levels over [-8, 8] before masking,
  so the aggregate the algorithm receives differs from the exact weighted mean by about 1e-6 per
  value: round-1 training (before any aggregation) is identical, every later metric agrees to 1e-4.

Every algorithm (FedEx-LoRA's dense downloads included), Flower's DP wrappers and mods, and
atoll's protections also run through the real ServerApp and ClientApps over an in-process Grid
(test_every_algorithm, test_protections_on_flower), seconds per run instead of a Ray start; the
Ray engine itself is exercised here and by test_protections_on_flower's simulation test.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from atoll.cli import app
from conftest import tiny_overrides
from helpers import assert_same_length, read_records, read_summary

# with the deployment tests, one Flower runtime at a time on the machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400), pytest.mark.xdist_group("flower-runtime")]

SECAGG_TOLERANCE = 1e-4


def assert_close(flower, local, tolerance, where=""):
    if isinstance(local, dict):
        assert set(flower) == set(local), where
        for key in local:
            assert_close(flower[key], local[key], tolerance, f"{where}.{key}")
    elif isinstance(local, float):
        assert flower == pytest.approx(local, abs=tolerance), where
    else:
        assert flower == local, where


def run_on_flower(tmp_path, **extra):
    """`atoll run --engine flower` on a plain-defaults config (not the quickstart) with one Ray actor."""
    config = tmp_path / "defaults.yaml"
    config.write_text("{}\n")
    args = ["run", str(config), "--quiet", "--engine", "flower"]
    values = {"flower.actors": 1, "run.plots": "false", "run.dir": str(tmp_path / "flower"), **extra}
    for item in tiny_overrides(tmp_path, **values):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return tmp_path / "flower", result.output


def compare_with_local(flower_dir, local_dir, tolerance):
    local_records, flower_records = (
        read_records(local_dir, drop=("seconds", "wall_seconds", "flower")),
        read_records(flower_dir, drop=("seconds", "wall_seconds", "flower")),
    )
    assert_same_length(flower_records, local_records, "metrics records")
    assert flower_records[1]["train"] == local_records[1]["train"]  # before any aggregation: identical
    for got, expected in zip(flower_records, local_records, strict=True):
        assert_close(got, expected, tolerance, f"round {expected['round']}")
    return flower_records


def test_secagg_fedit_in_simulation_matches_the_local_engine(tmp_path, reference_runs):
    local = reference_runs.get(**{"eval.local": "final"})
    flower, output = run_on_flower(tmp_path, **{"eval.local": "final", "flower.secagg.enabled": "true"})
    assert "fedit on synthetic-cls" in output
    records = compare_with_local(flower, local, SECAGG_TOLERANCE)
    assert [r["round"] for r in records] == [0, 1, 2]
    summary = read_summary(flower)
    assert summary["engine"]["secagg"] is True and summary["engine"]["mode"] == "simulation"
    flower_metrics = read_records(flower, drop=())[-1]["flower"]
    assert flower_metrics["dropped"] == [] and flower_metrics["online"] == [0, 1, 2, 3]
    assert (flower / "adapter" / "adapter_model.safetensors").is_file()


def test_a_flower_run_with_impossible_settings_fails_before_starting_anything(tmp_path):
    config = tmp_path / "defaults.yaml"
    config.write_text("{}\n")
    args = ["run", str(config), "--quiet", "--engine", "flower"]
    for item in tiny_overrides(tmp_path / "runs", **{"flower.secagg.enabled": "true", "algorithm.name": "flora"}):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "cannot run under SecAgg+" in result.output
    assert not (tmp_path / "runs").exists()


def test_flower_runs_are_not_resumable(tmp_path):
    from atoll.config import config_with
    from atoll.report.rundir import RunDir

    config = config_with(tiny_overrides(tmp_path, **{"engine": "flower"}))
    RunDir.create(tmp_path / "run", config)
    result = CliRunner().invoke(app, ["run", "--resume", str(tmp_path / "run")])
    assert result.exit_code == 2 and "cannot be resumed" in result.output
