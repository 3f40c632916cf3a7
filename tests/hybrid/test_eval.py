"""`atoll hybrid eval` and `chat` end to end: the cloud launched as a real `serve-cloud` process,
the run directory, the counts it reports, and one-line errors for bad configs."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from atoll.cli import app
from atoll.hybrid.evaluate import score

PERSONAL = "Hi, I'm Maria Gonzalez, mail maria.gonzalez@example.com. What is this text about? rain"


@pytest.fixture
def task_file(tmp_path):
    rows = [
        {"prompt": "What is this text about? rain storm cloud", "answer": "It is about weather, for example rain."},
        {"prompt": PERSONAL, "answer": "It is about weather, for example rain."},
        {"prompt": "What is this text about? pizza bread", "answer": "It is about food, for example pizza."},
    ]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, tiny_pair, task_file, **changes) -> str:
    tree = {
        "name": "tiny",
        "edge": {"model": str(tiny_pair["edge"]), "adapter": str(tiny_pair["adapter"])},
        "cloud": {"model": str(tiny_pair["cloud"]), "serve": True, "top_k": 5, "deadline_ms": 2000},
        "fusion": {"methods": ["edge", "cloud", "weighted", "proxy", "router"]},
        "task": {"source": str(task_file), "max_examples": 3, "max_new_tokens": 4, "template": "{prompt}\n"},
        "run": {"root": str(tmp_path / "runs")},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        tree[section][name] = value
    path = tmp_path / "hybrid.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_eval_writes_a_run_directory_with_every_method(tmp_path, tiny_pair, task_file):
    """Also: the launched cloud gets cloud.serve_workers and cloud.serve_cache_entries (its /health,
    in the summary: the per-position requests of a growing text hit its prefix cache)."""
    config = _config(tmp_path, tiny_pair, task_file, cloud__serve_workers=2, cloud__serve_cache_entries=16)
    result = CliRunner().invoke(app, ["hybrid", "eval", config])
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "table.md"}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 5 * 3
    summary = json.loads((run / "summary.json").read_text())
    by_method = {m["method"]: m for m in summary["methods"]}
    assert list(by_method) == ["edge", "cloud", "weighted", "proxy", "router"]
    edge = by_method["edge"]
    assert edge["bytes_sent"] == 0 and edge["fused_share"] == 0 and edge["prompts_kept_on_device"] == 0
    for name in ("cloud", "weighted", "proxy", "router"):
        method = by_method[name]
        assert method["prompts_kept_on_device"] == 1  # the prompt with a name and an e-mail address
        assert method["bytes_sent"] > 0 and method["tokens"] == edge["tokens"]
        personal_tokens = next(line["tokens"] for line in lines if line["method"] == name and line["kept_on_device"])
        asked = method["tokens"] - personal_tokens
        assert round(method["fused_share"] * method["tokens"]) + method["deadline_misses"] + method["cloud_errors"] == asked
        assert 0 <= method["next_token_accuracy"] <= 1 and method["latency_ms"]["p50"] <= method["latency_ms"]["p99"]
    assert "| router |" in (run / "table.md").read_text()
    server = summary["cloud_server"]
    assert server["workers"] == 2 and server["cache"]["entries"] == 16
    assert server["cache"]["hits"] > 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fusion__colour": "red"}, "unknown key 'fusion.colour'"),
        ({"edge__adapter": None}, "proxy-tuning needs a tuned edge"),
        ({"cloud__serve": False}, "fusion needs a cloud"),
        ({"cloud__deadline_ms": -1}, "cloud.deadline_ms"),
    ],
)
def test_bad_configs_fail_in_one_line_before_anything_is_written(tmp_path, tiny_pair, task_file, change, message):
    result = CliRunner().invoke(app, ["hybrid", "eval", _config(tmp_path, tiny_pair, task_file, **change)])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_chat_streams_an_edge_answer(tmp_path, tiny_pair):
    result = CliRunner().invoke(
        app,
        ["hybrid", "chat", "--method", "edge", "--edge", str(tiny_pair["edge"]), "--set", "task.max_new_tokens=3"],
        input="What is this text about?\n/quit\n",
    )
    assert result.exit_code == 0, result.output
    assert "method edge" in result.output and "[3 tokens, 0 fused, 0 deadline misses" in result.output


def test_generation_metrics():
    assert score("exact_match", "  It is  about Food ", "it is about food") == 1.0
    assert score("exact_match", "it is about food today", "it is about food") == 0.0
    assert score("contains", "so: it is about food.", "about FOOD") == 1.0


def test_the_cli_and_a_config_error_import_no_torch(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("fusion: {methods: [edge], colour: red}\n")
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom atoll.cli import app\n"
        f"result = CliRunner().invoke(app, ['hybrid', 'eval', {str(bad)!r}])\n"
        "assert result.exit_code == 2, result.output\nprint('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
