"""Bad input through the real command line: exit code 2, one line naming the problem and the fix,
no traceback, nothing written, and for config errors no torch imported. A diverging run stops
with exit 2 instead of finishing quietly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atoll.cli import app
from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parent.parent
TINY = "model: {name: tiny-bert, max_length: 32}\ndata: {source: synthetic-cls, max_examples: 300}\nfederation: {clients: 3, rounds: 1}\n"

# the real `atoll` command, in one fresh process for every case (one start-up, not one per case):
# each case runs in its own directory; afterwards the child reports which heavy modules it imported
ENTRY = """
import contextlib, io, json, os, sys, traceback
from atoll.cli import app
results = {}
for case, directory, args in json.loads(sys.argv[1]):
    os.chdir(directory)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            app(args, prog_name="atoll")
            code = 0
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            code, _ = "crashed", traceback.print_exc()
    results[case] = {"code": code, "stderr": stderr.getvalue()}
print(json.dumps({"results": results, "imported": [m for m in ("torch", "transformers") if m in sys.modules]}))
"""

SYSTEM = ROOT / "configs" / "sys" / "homogeneous-lab.yaml"
CSV = "text,label\n" + "a goal,sports\nrain,weather\n" * 30  # the header is line 1, row k is line k + 1
JSONL = "".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in [("a goal", "sports"), ("rain", "weather")] * 30)

CASES = {
    "latin-1 config": ({"c.yaml": ("name: caf\xe9\n" + TINY).encode("latin-1")}, [], "'c.yaml' is not UTF-8: byte 0xe9 at line 1"),
    "yaml 1.1 boolean": (
        {"c.yaml": TINY.replace("clients: 3", "clients: true")},
        [],
        "federation.clients: expected an integer, got the boolean true",
    ),
    "key given twice": ({"c.yaml": TINY + "federation: {rounds: 3}\n"}, [], "key 'federation' is given twice (first at line 3)"),
    "realistic without mode": (
        {"c.yaml": TINY},
        ["realistic.paradigm=fedasync"],
        "realistic.paradigm=fedasync has no effect without mode: realistic",
    ),
    "unwritable run root": ({"c.yaml": TINY}, ["run.root=/proc/atoll-runs"], "is not writable"),
    "name escaping the root": ({"c.yaml": TINY}, ["name=../../escaped"], "name: must be a plain name"),
    "max_length over positions": ({"c.yaml": TINY}, ["model.max_length=4096"], "exceeds the 512 positions of model 'tiny-bert'"),
    "missing data file": ({"c.yaml": TINY}, ["data.source=gone.csv"], "data file 'gone.csv' does not exist"),
    "unquoted comma in a csv row": (
        {"c.yaml": TINY, "d.csv": CSV + "hello, world,sports\n"},
        ["data.source=d.csv"],
        "'d.csv' line 62 has 3 fields but the header has 2 (text, label)",
    ),
    "latin-1 data file": (
        {"c.yaml": TINY, "d.csv": (CSV + "caf\xe9 cr\xe8me,food\n").encode("latin-1")},
        ["data.source=d.csv"],
        "'d.csv' is not UTF-8: byte 0xe9 at line 62",
    ),
    "jsonl error at its own line": (
        {"c.yaml": TINY, "d.jsonl": "".join(JSONL.splitlines(True)[:3]) + "\n\n" + '{"text": "x", "label": }\n' + JSONL},
        ["data.source=d.jsonl"],
        "'d.jsonl' line 6 is not valid JSON",
    ),
    # the byte-order mark is skipped, so the header's first column is 'text': the data passes and
    # the next check at the door (the model's positions) is the one that speaks
    "byte-order mark": (
        {"c.yaml": TINY, "d.csv": b"\xef\xbb\xbf" + CSV.encode()},
        ["data.source=d.csv", "data.text_column=text", "model.max_length=4096"],
        "exceeds the 512 positions",
    ),
    "misspelt target metric": (
        {"c.yaml": TINY},
        ["mode=realistic", f"system={SYSTEM}", "realistic.target_metric=acuracy", "realistic.target_value=0.8"],
        "realistic.target_metric 'acuracy' is not a metric of the classification task; did you mean 'accuracy'?",
    ),
}


@pytest.fixture(scope="module")
def door(tmp_path_factory) -> tuple[Path, dict]:
    """Every case of CASES through the command line in one child process: (base directory, results)."""
    base = tmp_path_factory.mktemp("door")
    cases = []
    for index, (case, (files, overrides, _)) in enumerate(CASES.items()):
        directory = base / f"case-{index}"
        directory.mkdir()
        for name, content in files.items():
            (directory / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        cases.append(
            (case, str(directory), ["run", "--quiet", "c.yaml"] + [item for override in overrides for item in ("--set", override)])
        )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run([sys.executable, "-c", ENTRY, json.dumps(cases)], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["imported"] == [], f"a config error imported {report['imported']}"
    return base, report["results"]


@pytest.mark.parametrize("case", list(CASES))
def test_a_config_error_is_one_line_exit_2_before_torch_and_writes_nothing(door, case):
    base, results = door
    files, _, fragment = CASES[case]
    result = results[case]
    assert result["code"] == 2, result["stderr"]
    stderr = result["stderr"]
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert stderr.startswith("atoll: ") and fragment in stderr, stderr
    directory = base / f"case-{list(CASES).index(case)}"
    assert sorted(p.name for p in directory.iterdir()) == sorted(files), "nothing written"
    assert not (base.parent / "escaped").exists()


runner = CliRunner()


def invoke(config: Path, overrides: list[str]):
    return runner.invoke(app, ["run", "--quiet", str(config)] + [item for override in overrides for item in ("--set", override)])


@pytest.fixture
def empty_config(tmp_path) -> Path:
    path = tmp_path / "defaults.yaml"
    path.write_text("{}\n")
    return path


def one_clean_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_a_trainable_module_the_model_lacks_is_refused_before_any_run_directory(tmp_path, empty_config):
    result = invoke(empty_config, tiny_overrides(tmp_path / "runs", **{"model.lora.trainable_modules": "[embed_tokenz]"}))
    line = one_clean_line(result)
    assert "model.lora.trainable_modules names ['embed_tokenz'], which match no module of this model" in line
    assert "word_embeddings" in line and "classifier" in line
    assert not (tmp_path / "runs").exists()


def test_trainable_module_names_follow_peft():
    """A module name or a dotted suffix of one is accepted (PEFT's modules_to_save match), a
    fragment of a name is not."""
    import torch

    from atoll.errors import ModelError
    from atoll.models.registry import check_trainable_modules

    model = torch.nn.Module()
    model.embeddings = torch.nn.Module()
    model.embeddings.word_embeddings = torch.nn.Embedding(4, 2)
    model.embeddings.LayerNorm = torch.nn.LayerNorm(2)
    model.classifier = torch.nn.Linear(2, 3)
    check_trainable_modules(model, ["classifier", "word_embeddings", "embeddings.LayerNorm", "embeddings"])
    with pytest.raises(
        ModelError, match=r"names \['beddings'\], which match no module.*choose from: LayerNorm, classifier, word_embeddings"
    ):
        check_trainable_modules(model, ["beddings"])


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--engine", "flower"], "--engine cannot be combined with --resume"),
        (["--dry-run"], "--dry-run cannot be combined with --resume"),
        (["--set", "federation.rounds=9"], "--set cannot be combined with --resume"),
    ],
)
def test_resume_refuses_what_it_would_ignore(tmp_path, args, fragment):
    assert fragment in one_clean_line(runner.invoke(app, ["run", "--resume", str(tmp_path), *args]))


def test_resuming_a_run_whose_config_was_damaged_names_the_file(tmp_path):
    (tmp_path / "config.yaml").write_text("federation: {clients: 0}\n")
    line = one_clean_line(runner.invoke(app, ["run", "--resume", str(tmp_path)]))
    assert f"the run's {tmp_path / 'config.yaml'} is not a valid config: federation.clients" in line
    assert "does not exist" in one_clean_line(runner.invoke(app, ["run", "--resume", str(tmp_path / "gone")]))


def test_resume_checks_the_run_directory_not_run_root(tmp_path):
    """A run resumed from another working directory (its relative run.root elsewhere, or not
    writable) is checked where it is; here the check after the door is the one that speaks."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        TINY.replace("max_examples: 300", "max_examples: 300, label_column: stars") + "run: {root: /proc/atoll-runs}\n"
    )
    line = one_clean_line(runner.invoke(app, ["run", "--resume", str(run)]))
    assert "column 'stars' (data.label_column) does not exist" in line, line


def test_a_diverging_run_stops_with_exit_2_and_keeps_its_metrics(tmp_path, empty_config):
    run_dir = tmp_path / "diverged"
    overrides = tiny_overrides(
        tmp_path / "runs",
        **{"train.lr": 50, "train.max_grad_norm": "null", "federation.rounds": 4, "run.dir": str(run_dir), "run.plots": "false"},
    )
    result = invoke(empty_config, overrides)
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("atoll: run diverged: train loss at round 1 is") and "times round 0's global loss" in last, last
    assert "lower train.lr" in last
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1], "stopped at the round that diverged"
    assert not (run_dir / "summary.json").exists()


def test_the_divergence_watch_by_hand():
    """Reference: round 0's global loss, else the first train loss; 100 times it stops the run."""
    from atoll.errors import DivergenceError
    from atoll.report.divergence import DivergenceWatch

    watch = DivergenceWatch([{"round": 0, "global": {"loss": 1.1}}])
    watch.observe({"round": 1, "train": {"loss": 109.0, "examples": 8.0}}, "here")
    with pytest.raises(DivergenceError, match="train loss at round 2 is 111, 101 times round 0's global loss 1.1"):
        watch.observe({"round": 2, "train": {"loss": 111.0, "examples": 8.0}}, "here")
    near_zero = DivergenceWatch()
    near_zero.observe({"round": 1, "train": {"loss": 0.001, "examples": 8.0}}, "here")
    near_zero.observe({"round": 2, "train": {"loss": 5.0, "examples": 8.0}}, "here")  # 100 x the floor 0.1 is 10
    with pytest.raises(DivergenceError, match="global loss at round 3 is 11"):
        near_zero.observe({"round": 3, "global": {"loss": 11.0}}, "here")
    with pytest.raises(DivergenceError, match="not finite"):
        DivergenceWatch().observe({"round": 1, "train": {"loss": float("nan"), "examples": 8.0}}, "here")
    DivergenceWatch().observe({"round": 1, "train": {"loss": 0.0, "examples": 0.0}}, "here")  # nobody trained: no reference


def test_the_divergence_watch_takes_records_without_a_round():
    """Split learning and hybrid inference reuse the Recorder with records of their own shape."""
    from atoll.errors import DivergenceError
    from atoll.report.divergence import DivergenceWatch

    watch = DivergenceWatch([{"step": 1, "train": {"loss": 2.0}}])
    with pytest.raises(DivergenceError, match="train loss at round \\? is 300"):
        watch.observe({"step": 2, "train": {"loss": 300.0}}, "here")
