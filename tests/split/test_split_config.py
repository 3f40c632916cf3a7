"""Split configs and the `atoll split` commands: bad input is one line and exit code 2 with nothing
written; config checks import no torch; a run writes the documented run directory."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from atoll.cli import app
from atoll.errors import ConfigError
from atoll.split.config import split_config_with
from atoll.split.plugins import ATTACKS, DEFENSES
from .helpers import split_overrides


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["split.cut=2"], "unknown key 'split.cut'; allowed here: partition, head_blocks"),
        (["split.partition=head-body"], "split.partition: Input should be 'head-tail' or 'head-body-tail'"),
        (["split.tail_blocks=1"], "split.tail_blocks=1 needs split.partition=head-body-tail"),
        (["data.task=summarise"], "unknown task 'summarise'"),
        (["defenses=[{name: dp}]"], "unknown defense 'dp'"),
        (["defenses=[{name: gaussian-noise, sigma: -1}]"], "defenses[0].sigma: Input should be greater than or equal to 0"),
        (["attacks=[{name: white-box-inversion, knows: everything}]"], "unknown parameter 'knows' of attack 'white-box-inversion'"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        split_config_with(overrides)


def test_checking_a_config_with_every_defense_and_attack_imports_no_torch(tmp_path):
    config = {"defenses": [{"name": n} for n in DEFENSES], "attacks": [{"name": n} for n in ATTACKS]}
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(config))
    code = (
        "import sys\n"
        "from atoll.split.config import load_split_config\n"
        f"load_split_config({str(path)!r})\n"
        "assert 'torch' not in sys.modules, 'a defense or attack module imports torch at module level'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _write(tmp_path, **extra) -> str:
    tree: dict = {}
    for assignment in split_overrides(tmp_path / "runs", **extra):
        key, _, value = assignment.partition("=")
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    path = tmp_path / "split.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_split_run_writes_the_run_directory(tmp_path):
    config = _write(tmp_path, **{"run.plots": "true", "run.dir": str(tmp_path / "run")})
    result = CliRunner().invoke(app, ["split", "run", config, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "head-tail (1+1+0 blocks), 1 data party, local transport" in result.output
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "metrics.png"):
        assert (run / name).is_file(), name
    for party in ("data_party_0", "model_party"):
        assert (run / party / "adapter" / "adapter_config.json").is_file()
        assert (run / party / "adapter" / "adapter_model.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 6]
    assert records[-1]["traffic"]["bytes_to_model"] > records[1]["traffic"]["bytes_to_model"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_party"]["steps"] == 6 and "accuracy" in summary["final"] and "majority_class_rate" in summary
    data_config = json.loads((run / "data_party_0" / "adapter" / "adapter_config.json").read_text())
    model_config = json.loads((run / "model_party" / "adapter" / "adapter_config.json").read_text())
    assert data_config["layers_to_transform"] == [0] and model_config["layers_to_transform"] == [1]


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"split.head_blocks": 2}, "the cut leaves the model party 0 of the model's 2 blocks"),
        ({"data.source": "no-such-file.jsonl"}, "data file 'no-such-file.jsonl' does not exist"),
        ({"model.name": "minilm", "data.source": "synthetic-sft"}, "is an encoder and cannot generate"),
    ],
)
def test_split_run_bad_input_is_one_line_and_writes_nothing(tmp_path, extra, message):
    config = _write(tmp_path, **extra)
    result = CliRunner().invoke(app, ["split", "run", config, "--quiet"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "runs").exists()


def test_a_config_error_comes_before_any_heavy_import():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from atoll.cli import app\n"
        "result = CliRunner().invoke(app, ['split', 'run', 'missing.yaml', '--set', 'split.cut=1'])\n"
        "assert result.exit_code == 2 and 'missing.yaml' in result.output, result.output\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_split_list_and_config_commands():
    runner = CliRunner()
    listing = runner.invoke(app, ["split", "list"])
    assert listing.exit_code == 0 and "gaussian-noise" in listing.output and "white-box-inversion" in listing.output
    detail = runner.invoke(app, ["split", "list", "gaussian-noise"])
    assert "sigma" in detail.output
    keys = runner.invoke(app, ["split", "config"])
    assert "split.head_blocks" in keys.output and "record.every" in keys.output


def test_every_shipped_split_config_loads(tmp_path):
    """Every run config loads; every cell of the bench grid is a valid run config whose attacks'
    parameters parse (bench.yaml is a grid, not a run config)."""
    from pathlib import Path

    from atoll.split.bench import cell_tree, cells, load_bench_config
    from atoll.split.config import build_split_config, load_split_config
    from atoll.split.plugins import parse_plugin_params

    folder = Path(__file__).resolve().parents[2] / "configs" / "split"
    names = sorted(p.name for p in folder.glob("*.yaml"))
    assert "quickstart.yaml" in names and "bench.yaml" in names
    for name in names:
        if name != "bench.yaml":
            load_split_config(folder / name)
    bench = load_bench_config(folder / "bench.yaml")
    grid = cells(bench)
    assert len(grid) >= len(bench.cuts) + len(bench.defenses)
    for cell in grid:
        tree = cell_tree(bench, cell, tmp_path)
        config = build_split_config({**tree, "attacks": []})
        assert [d.name for d in config.defenses] == ([bench.defenses[cell["sweep"]].name] if cell["defense"] else [])
        for attack in tree["attacks"]:
            parse_plugin_params("attack", attack["name"], {k: v for k, v in attack.items() if k != "name"}, attack["name"])
        cut = bench.cuts[cell["cut"]]
        assert config.model.name == (cut.model or bench.base["model"]["name"])
    assert any(cut.model == "atoll-edge" and cut.label.startswith("atoll-edge, head-tail") for cut in bench.cuts)


def test_record_start_keeps_only_later_training_steps():
    """record.start: the model party keeps training steps from `start` on (every `every`, at most
    `limit`), so attacks can read what a defense sends once it has trained; evaluation and
    generation messages are not held back by it."""
    from atoll.split.model_party import record_policy
    from atoll.split.transcript import RecordPolicy

    def kept(policy: RecordPolicy, phase: str = "train") -> list[int]:
        memory: dict = {}
        steps = []
        for step in range(1, 13):
            if policy.wants(phase, 0, step, memory):
                memory[(0, phase)].add(step)
                steps.append(step)
        return steps

    assert kept(RecordPolicy(every=1, limit=3)) == [1, 2, 3]
    assert kept(RecordPolicy(every=1, limit=3, start=9)) == [9, 10, 11]
    assert kept(RecordPolicy(every=2, limit=8, start=7)) == [8, 10, 12]
    assert kept(RecordPolicy(every=1, limit=3, start=9, phases=("eval",)), "eval") == [1, 2, 3]
    config = split_config_with(
        split_overrides("runs", **{"attacks": "[{name: white-box-inversion}]", "record.start": 37, "record.limit": 4})
    )
    policy = record_policy(config)
    assert (policy.every, policy.start, policy.limit) == (1, 37, 4)
    with pytest.raises(ConfigError, match="record.start"):
        split_config_with(split_overrides("runs", **{"record.start": 0}))


def test_data_labels_fixes_the_class_ids(split_config):
    """data.labels (atoll's data section) fixes the label set and its class-id order in split runs
    too; a label outside it is a data error naming the fix."""
    from atoll.data.sources import load_source
    from atoll.errors import DataError
    from atoll.split.setup import prepare

    found = sorted({str(v) for v in load_source("synthetic-cls").columns["label"]})
    setup = prepare(split_config(**{"data.labels": "[" + ", ".join(reversed(found)) + "]"}))
    assert setup.label_names == list(reversed(found)) and setup.num_labels == len(found)
    with pytest.raises(DataError, match="add them to data.labels"):
        prepare(split_config(**{"data.labels": f"[{found[0]}, {found[1]}]"}))
