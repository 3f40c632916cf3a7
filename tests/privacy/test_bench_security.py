"""`atoll bench security` through the CLI on a tiny matrix (random-init tiny BERT, 4 clients, 1
round): every cell is a real run whose numbers land in the table, a refused combination is shown
with the run config's reason, a finished cell is not run again, and the hand-written rest of the
page is kept."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from atoll.cli import app
from atoll.privacy.bench.render import END, START

TINY = {
    "model.name": "tiny-bert",
    "data.source": "synthetic-cls",
    "data.max_examples": 200,
    "federation.clients": 4,
    "federation.rounds": 1,
    "train.local_steps": 1,
    "train.batch_size": 16,
    "eval.batch_size": 128,
    "eval.local": "never",
    "eval.initial": False,
}


def write_matrix(root) -> str:
    (root / "base.yaml").write_text("name: tiny\n")
    matrix = {
        "tasks": {
            "tiny": {
                "title": "tiny BERT, synthetic topics, 4 clients, 1 round",
                "config": "base.yaml",
                "set": TINY,
                "protections": {
                    "none": {},
                    "norm-bounding": {"robust.rule": "norm-bounding", "robust.norm_bound": 0.01},
                    "krum": {"robust.rule": "krum", "robust.byzantine": 1},  # 4 clients <= 2f + 2: refused
                },
                "attacks": {"sign-flip": {"attack.kind": "sign-flip", "attack.clients": [1], "attack.byzantine.scale": 5.0}},
            }
        }
    }
    path = root / "matrix.yaml"
    path.write_text(json.dumps(matrix))  # JSON is YAML
    return str(path)


def test_bench_security_runs_the_matrix_once_and_writes_the_table(tmp_path):
    matrix, doc, runs = write_matrix(tmp_path), tmp_path / "security.md", tmp_path / "runs"
    doc.write_text("# Page\n\nhand-written text\n")
    command = ["bench", "security", matrix, "--doc", str(doc), "--runs", str(runs)]
    first = CliRunner().invoke(app, command)
    assert first.exit_code == 0, first.output
    text = doc.read_text()
    assert text.startswith("# Page\n\nhand-written text\n") and START in text and END in text
    assert "| krum | sign-flip | refused: " in text and "more than 2f + 2" in text
    results = json.loads((tmp_path / "security-bench.json").read_text())["results"]
    assert sorted(results) == sorted(f"tiny/{p}--sign-flip" for p in ("none", "norm-bounding", "krum"))
    for key in ("tiny/none--sign-flip", "tiny/norm-bounding--sign-flip"):
        summary = json.loads((runs / key / "summary.json").read_text())
        row = results[key]["row"]
        assert row["value"] == summary["final_global"]["accuracy"] and row["cpu_seconds"] > 0
        assert f"| {results[key]['protection']} | {results[key]['attack']} | {row['value']:.3g} |" in text
    # norm bounding keeps the sign flipper (its change clipped), Krum is never run
    assert results["tiny/norm-bounding--sign-flip"]["row"]["robust_attackers_kept"] == 1.0
    assert not (runs / "tiny" / "krum--sign-flip").exists()
    assert (tmp_path / "security-tiny.png").is_file()

    # a second sitting runs nothing; a cell whose run was lost is run again, alone
    finished = {key: (runs / key / "summary.json").stat().st_mtime_ns for key in results if "row" in results[key]}
    (runs / "tiny/none--sign-flip/summary.json").unlink()
    second = CliRunner().invoke(app, command)
    assert second.exit_code == 0, second.output
    assert "1 of 2 runs already finished; running 1" in second.output
    for key, stamp in finished.items():
        assert ((runs / key / "summary.json").stat().st_mtime_ns == stamp) == (key != "tiny/none--sign-flip")
    assert doc.read_text().count(START) == 1


def test_a_bad_matrix_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "matrix.yaml"
    path.write_text("tasks: {tiny: {title: t, config: nowhere.yaml, protections: {none: {}}, attacks: {none: {}}}}\n")
    result = CliRunner().invoke(app, ["bench", "security", str(path), "--runs", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "nowhere.yaml' does not exist" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
