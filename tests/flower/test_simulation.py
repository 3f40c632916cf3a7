"""Flower's simulation engine (a private SuperLink in simulation mode, Ray actors as ClientApps),
started through `atoll run --engine flower`, against the local engine's reference run:

- FedIT under SecAgg+: SecAgg+ quantizes each upload to 2**22 levels over [-8, 8] before masking,
  so the aggregate the algorithm receives differs from the exact weighted mean by about 1e-6 per
  value: round-1 training (before any aggregation) is identical, every later metric agrees to 1e-4.
- FedEx-LoRA, whose downloads from round 2 on carry the dense residual merged into the base: the
  local engine's metrics to 1e-6.
- FedIT under client-side fixed clipping (Flower's ``fixedclipping_mod`` in the ClientApp, its
  ``DifferentialPrivacyClientSideFixedClipping`` in the ServerApp) with a bound far below every
  update's norm and no noise: the global adapter after the round is the initial one plus the
  equal-weight mean of the clipped updates, computed here, to 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from atoll.cli import app
from atoll.config import load_config
from conftest import tiny_overrides
from helpers import assert_same_length, clipped_round_one, read_records, read_summary

# with the deployment tests, one Flower runtime at a time on the machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400), pytest.mark.xdist_group("flower-runtime")]

SECAGG_TOLERANCE = 1e-4
TOLERANCE = 1e-6


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


def test_a_dense_downlink_algorithm_in_simulation_matches_the_local_engine(tmp_path, reference_runs):
    extra = {"algorithm.name": "fedex-lora", "eval.local": "final"}
    local = reference_runs.get(**extra)
    flower, _ = run_on_flower(tmp_path, **extra)
    records = compare_with_local(flower, local, TOLERANCE)
    # round 2's downloads carry round 1's residual: a dense matrix per adapted module
    assert records[2]["bytes_down"] > 2 * records[1]["bytes_down"]
    assert (flower / "adapter" / "base_delta.safetensors").is_file()


def test_client_side_clipping_in_simulation_clips_every_update_to_the_bound(tmp_path):
    clip = 1e-3
    flower, _ = run_on_flower(
        tmp_path,
        **{
            "federation.rounds": 1,
            "eval.local": "never",
            "flower.dp.mode": "client-fixed",
            "flower.dp.clipping_norm": clip,
            "flower.dp.noise_multiplier": 0.0,
        },
    )
    assert read_summary(flower)["engine"]["dp"] == "client-fixed"
    expected = clipped_round_one(load_config(flower / "config.yaml"), clip, tmp_path / "computed")
    assert len(expected.update_norms) == 4 and min(expected.update_norms) > 10 * clip, "the bound must clip every update"
    got = load_file(str(flower / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(expected.expected_adapter / "adapter_model.safetensors"))
    initial = load_file(str(expected.initial_adapter / "adapter_model.safetensors"))
    assert set(got) == set(want) == set(initial)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=TOLERANCE), key
    moved = torch.sqrt(sum(((got[key] - initial[key]) ** 2).sum() for key in got))
    assert clip / 2 < float(moved) <= clip * (1 + 1e-4), "the mean of updates clipped to the bound moves the global by at most the bound"


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
