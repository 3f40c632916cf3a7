"""`atoll split bench`: the defense capability score as VFLAIR-LLM defines it, checked by hand, and
a two-cell grid on tiny-llama run through the command: it records each cell, resumes without
rerunning finished cells, and writes the table (between its markers) and the trade-off plot."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from atoll.cli import app
from atoll.split import bench


def test_dcs_and_its_averages_by_hand():
    # DCS = 1 / (1 + sqrt((1 - beta)(AP - AP*)^2 + beta (MP - MP*)^2)): AP 0.3 (ideal 0), MP 0.6 (ideal 0.8), beta 0.5
    assert bench.dcs(0.3, 0.0, 0.6, 0.8, 0.5) == pytest.approx(1 / (1 + math.sqrt(0.065)))
    assert bench.dcs(0.0, 0.0, 0.8, 0.8, 0.5) == 1.0  # a perfect defense
    none = {"cut": 0, "defense": None, "mp": 0.8, "majority_class_rate": 0.5, "attacks": {"white-box-inversion": {"token_recall": 1.0}}}
    defended = {
        "cut": 0,
        "defense": "x",
        "mp": 0.6,
        "majority_class_rate": 0.5,
        "attacks": {
            "white-box-inversion": {"token_recall": 0.3},
            "norm-scoring": {"auc": 0.7},
            "batch-label-inference": {"recovery_rate": 0.5},
        },
    }
    scored = {r["defense"]: r for r in bench.scores([none, defended], beta=0.5)}
    # MP* is the undefended run's 0.8; AP*: recall 0, AUC 0.5, recovery = the majority-class rate 0.5
    vmi = 1 / (1 + math.sqrt(0.5 * 0.3**2 + 0.5 * 0.2**2))
    ns = 1 / (1 + math.sqrt(0.5 * 0.2**2 + 0.5 * 0.2**2))
    bli = 1 / (1 + math.sqrt(0.5 * 0.2**2))
    assert scored["x"]["dcs"] == pytest.approx({"white-box-inversion": vmi, "norm-scoring": ns, "batch-label-inference": bli})
    assert scored["x"]["t_dcs"] == pytest.approx({"inputs": vmi, "labels": (ns + bli) / 2})
    assert scored["x"]["c_dcs"] == pytest.approx((vmi + (ns + bli) / 2) / 2)
    assert scored[None]["dcs"]["white-box-inversion"] == pytest.approx(1 / (1 + math.sqrt(0.5)))  # no defense: AP 1 -> 0.586


def test_bench_command_runs_the_grid_resumes_and_writes_the_table(tmp_path):
    grid = {
        "base": {
            "model": {"name": "tiny-llama", "max_length": 24},
            "data": {"source": "synthetic-cls", "max_examples": 240, "test_size": 40},
            "train": {"lr": 0.01, "batch_size": 8, "steps": 3},
            "eval": {"every": 3, "initial": False, "batch_size": 64},
            "record": {"limit": 1},
        },
        "cuts": [{"partition": "head-tail", "head_blocks": 1}],
        "attacks": [
            {"name": "white-box-inversion", "steps": 60, "lr": 0.1, "batches": 1, "rows": 4},
            {"name": "batch-label-inference", "steps": 5},  # needs head-body-tail: left out of this cut's cells
        ],
        "defenses": [{"name": "gaussian-noise", "param": "sigma", "values": [0.3], "more_private": "higher"}],
    }
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(grid))
    doc = tmp_path / "doc.md"
    doc.write_text("# A document\n\nkept text\n")
    out, plot = tmp_path / "out", tmp_path / "tradeoff.png"
    command = ["split", "bench", str(config), "--out", str(out), "--doc", str(doc), "--plot", str(plot)]

    first = CliRunner().invoke(app, command)
    assert first.exit_code == 0, first.output
    records = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["cut0/none", "cut0/gaussian-noise@sigma=0.3"]
    recall = {r["defense"]: r["attacks"]["white-box-inversion"]["token_recall"] for r in records}
    assert all("batch-label-inference" not in r["attacks"] for r in records)
    assert recall[None] >= 0.9 and recall["gaussian-noise"] <= 0.5  # measured on the real runs of the grid
    text = doc.read_text()
    assert text.startswith("# A document\n\nkept text\n") and text.count(bench.START) == 1 and text.count(bench.END) == 1
    assert f"Made by `atoll split bench {config}`" in text
    assert "| gaussian-noise | sigma = 0.3 |" in text and "| none |" in text and plot.stat().st_size > 0

    second = CliRunner().invoke(app, command)  # resumes: nothing left to run, the table is replaced, not appended
    assert second.exit_code == 0 and "2 cells done, 0 to run" in second.output
    assert doc.read_text().count(bench.START) == 1
    assert len((out / "bench.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    "grid,message",
    [
        ("cuts: [{partition: head-tail, head_blok: 1}]\ndefenses: []\nattacks: []\n", "cuts.0.head_blok: Extra inputs are not permitted"),
        (
            "cuts: [{head_blocks: 1}]\ndefenses: [{name: mid, param: wieght, values: [1]}]\nattacks: []\n",
            "unknown parameter 'wieght' of defense 'mid'",
        ),
        ("cuts: [{head_blocks: 1}]\ndefenses: []\nattacks: [{name: bisr, knows: all}]\n", "unknown parameter 'knows' of attack 'bisr'"),
        ("cuts: [{head_blocks: 1}]\ndefenses: [{name: nodef}]\nattacks: []\n", "unknown defense 'nodef'"),
    ],
)
def test_a_bad_grid_is_one_line_before_anything_runs(tmp_path, grid, message):
    config, doc, out = tmp_path / "bench.yaml", tmp_path / "doc.md", tmp_path / "out"
    config.write_text(grid)
    doc.write_text("kept\n")
    result = CliRunner().invoke(
        app, ["split", "bench", str(config), "--out", str(out), "--doc", str(doc), "--plot", str(tmp_path / "p.png")]
    )
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists() and doc.read_text() == "kept\n" and not (tmp_path / "p.png").exists()


def test_the_table_follows_the_grid_not_the_order_cells_ran_in():
    """A setting added to a sweep later runs last (the bench resumes) but is shown next to the
    defense's other settings."""
    grid = bench.BenchConfig.model_validate(
        {
            "cuts": [{"partition": "head-tail", "head_blocks": 1}],
            "attacks": [{"name": "white-box-inversion"}],
            "defenses": [
                {"name": "nopeek", "param": "weight", "values": [5.0, 100.0]},
                {"name": "gaussian-noise", "param": "sigma", "values": [2.0]},
            ],
        }
    )
    ran = ["cut0/none", "cut0/nopeek@weight=5.0", "cut0/gaussian-noise@sigma=2.0", "cut0/nopeek@weight=100.0"]
    grid_cells = {cell["id"]: cell for cell in bench.cells(grid)}
    records = [
        {
            **grid_cells[name],
            "mp": 0.5,
            "majority_class_rate": 0.4,
            "main_metric": "accuracy",
            "attacks": {"white-box-inversion": {"token_recall": 0.5}},
        }
        for name in ran
    ]
    table = bench.render_table(grid, records, "atoll split bench grid.yaml", "")
    rows = [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == [["| none", ""], ["| nopeek", "weight = 5.0"], ["| nopeek", "weight = 100.0"], ["| gaussian-noise", "sigma = 2.0"]]
