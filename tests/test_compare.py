"""`atoll bench sweep` and `atoll bench algorithms` through the CLI on a tiny suite: the learning
rate chosen on the validation split, every cell's interval and paired difference computed from
its runs, a killed bench continuing where it stopped, --render-only and --rerun."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from atoll.experiment import Splits, majority_rates

T_975_1 = math.tan(math.pi * 0.475)  # Student t, 1 degree of freedom (two seeds): 12.706

BASE = {
    "model": {"name": "tiny-bert", "max_length": 32},
    "data": {"source": "synthetic-cls", "max_examples": 300, "test_size": 60, "validation_size": 40, "split_seed": 0},
    "federation": {"clients": 3, "rounds": 2},
    "train": {"local_steps": 2, "batch_size": 16, "schedule": "cosine", "round_decay": 0.8},
    "eval": {"every": 1, "local": "final"},
}
SUITE = {
    "seeds": 2,
    "families": {"averaging": {"representative": "fedit", "members": ["fedit", "local-only"]}},
    "sweep": {"learning_rates": [0.0001, 0.05]},
    "tasks": {
        "topics": {
            "title": "tiny-bert on synthetic topics",
            "config": "base.yaml",
            "metric": "accuracy",
            "partitions": {"iid": ["partition.name=iid"]},
            "algorithms": ["local-only", "fedit"],  # local-only first: its overrides must not make the budget paragraph
            "target": 0.0,
            "overrides": {"local-only": ["eval.max_examples=30"]},  # its global column: one pass per client
        }
    },
}


def test_majority_rates_by_hand():
    labels = np.array([0, 0, 1, 2, 2, 2, 1, 1, 1, 0])
    splits = Splits(
        global_test=np.array([0, 1, 2, 3, 4]),  # labels 0 0 1 2 2 -> 2 of 5
        client_train=[np.array([5]), np.array([6])],
        client_test=[np.array([6, 7, 8]), np.array([9]), np.array([], dtype=np.int64)],  # 3 of 3, 1 of 1; empty skipped
        label_table=np.zeros((3, 3)),
    )
    spec = SimpleNamespace(kind="classification", num_labels=3)
    assert majority_rates(spec, SimpleNamespace(labels=labels), splits) == (0.4, 1.0)
    splits.client_test = [np.array([6, 7, 3]), np.array([0, 9, 3, 4])]  # 2 of 3 and 2 of 4 -> 4 of 7
    assert majority_rates(spec, SimpleNamespace(labels=labels), splits)[1] == 4 / 7
    assert majority_rates(SimpleNamespace(kind="sft", num_labels=0), SimpleNamespace(labels=labels), splits) == (None, None)


def bench(*args):
    """`atoll bench ...` through the CLI."""
    from typer.testing import CliRunner

    from atoll.cli import app

    return CliRunner().invoke(app, ["bench", *map(str, args)])


def table_rows(text: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines() if line.startswith("| ")}


def figure(values: list[float], errors: list[float]) -> str:
    """The table's cell, recomputed in closed form: mean ± t(0.975, 1) s / sqrt(2) (mean se)."""
    return f"{np.mean(values):.3f} ± {T_975_1 * np.std(values, ddof=1) / math.sqrt(2):.3f} ({np.mean(errors):.3f})"


@pytest.fixture
def suite(tmp_path) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(SUITE))
    return path


def test_sweep_then_bench_with_intervals_resume_render_only_and_rerun(suite, tmp_path, monkeypatch):
    sweep_runs, runs, out = tmp_path / "sweep", tmp_path / "runs", tmp_path / "docs"
    # 1. the sweep: one run of the family's representative per learning rate, scored on the
    # validation split; the better one is written to the suite's learning-rate file
    swept = bench("sweep", suite, "--runs", sweep_runs, "--workers", 1)
    assert swept.exit_code == 0, swept.output
    chosen = yaml.safe_load((tmp_path / "learning-rates.yaml").read_text())
    scores = {lr: chosen["scores"]["topics"]["averaging"][lr]["iid"] for lr in ("0.0001", "0.05")}
    for lr, score in scores.items():
        run = json.loads((sweep_runs / "topics" / "iid" / f"fedit-lr{lr}" / "summary.json").read_text())
        assert run["global_test_examples"] == 40 and score == round(run["final_global"]["accuracy"], 5)  # the validation set
    assert scores["0.05"] > scores["0.0001"], scores  # 0.0001 barely moves the adapter in 4 steps
    assert chosen["chosen"] == {"topics": {"averaging": 0.05}}

    # 2. the bench, killed (Ctrl-C) in the second round of fedit's seed-1 run
    from atoll.sim.prototype import SynchronousLoop

    play_round = SynchronousLoop.play_round

    def interrupted(self, round):
        if round == 2 and self.recorder.run_dir.path.name == "fedit-seed1":
            raise KeyboardInterrupt
        return play_round(self, round)

    monkeypatch.setattr(SynchronousLoop, "play_round", interrupted)
    command = ["algorithms", suite, "--runs", runs, "--out", out, "--workers", 1]
    killed = bench(*command)
    assert killed.exit_code != 0 and not (out / "algorithms.md").exists()
    assert (runs / "topics" / "iid" / "local-only-seed1" / "summary.json").is_file()
    assert not (runs / "topics" / "iid" / "fedit-seed1" / "summary.json").is_file()
    monkeypatch.setattr(SynchronousLoop, "play_round", play_round)
    moved = bench("algorithms", suite, "--runs", runs, "--out", out, "--workers", 1, "--seeds", 3)
    assert moved.exit_code == 2 and "holds another bench" in moved.output and moved.output.count("\n") == 1, moved.output
    resumed = bench(*command)  # the same command continues: the finished runs are kept, the killed one resumes
    assert resumed.exit_code == 0, resumed.output
    assert "continuing the bench" in resumed.output and "3 of 4 runs already finished; running 1" in resumed.output
    assert json.loads((runs / "topics" / "iid" / "fedit-seed1" / "bench-cell.json").read_text())["resumed"] is True
    killed_sitting, sitting = json.loads((runs / "bench.json").read_text())["sittings"]
    assert (
        killed_sitting["runs"] == 4 and killed_sitting["minutes"] > 0 and sitting["runs"] == 1
    )  # the killed one's time up to its last run

    # 3. every cell: mean ± 95 % t-interval (test-set standard error), and the paired difference
    table = (out / "algorithms.md").read_text()
    rows = table_rows(table)
    finals = {
        (a, s): json.loads((runs / "topics" / "iid" / f"{a}-seed{s}" / "summary.json").read_text())
        for a in ("fedit", "local-only")
        for s in (0, 1)
    }
    for algorithm in ("fedit", "local-only"):
        for column, scope in ((0, "final_global"), (2, "final_local")):
            values = [finals[(algorithm, s)][scope]["accuracy"] for s in (0, 1)]
            errors = [finals[(algorithm, s)][scope]["accuracy_se"] for s in (0, 1)]
            assert rows[algorithm][column] == figure(values, errors)
        config = yaml.safe_load((runs / "topics" / "iid" / f"{algorithm}-seed0" / "config.yaml").read_text())
        assert config["train"]["lr"] == 0.05  # the family's swept rate
    differences = [finals[("local-only", s)]["final_global"]["accuracy"] - finals[("fedit", s)]["final_global"]["accuracy"] for s in (0, 1)]
    half = T_975_1 * np.std(differences, ddof=1) / math.sqrt(2)
    assert rows["local-only"][1].strip("*") == f"{np.mean(differences):+.3f} ± {half:.3f}"
    assert rows["fedit"][1] == ""  # the reference has no difference with itself
    assert finals[("local-only", 0)]["global_test_examples"] == 30 and finals[("fedit", 0)]["global_test_examples"] == 60
    assert "local-only's runs also set `eval.max_examples=30`." in table and "global test set 60 examples" in table
    assert rows["fedit"][4] == "1.0 (2/2)"  # target 0: reached at the first evaluated round
    assert " in 2 sittings, " in table and "Chosen at an edge of the grid (a wider grid may do better): averaging." in table
    assert "lr 0.05" in table and "**" in table.split("### topics")[0]  # the sweep table marks the chosen rate
    assert (out / "algorithms.png").stat().st_size > 0 and (out / "algorithms-curves-topics.png").stat().st_size > 0
    statistics = json.loads((out / "algorithms.json").read_text())["topics/iid/local-only"]
    assert statistics["global_accuracy_minus_fedit"]["mean"] == pytest.approx(np.mean(differences))

    # 4. --render-only rewrites the same page from the finished runs, running nothing
    (out / "algorithms.md").unlink()
    rendered = bench("algorithms", "--render-only", "--runs", runs, "--out", out)
    assert rendered.exit_code == 0, rendered.output
    assert (out / "algorithms.md").read_text() == table

    # 5. --rerun: fedit's cells run again from scratch (the same seeds give the same numbers, so the
    # resumed run ended where an uninterrupted one does); local-only is left alone
    stale, kept = runs / "topics" / "iid" / "fedit-seed1" / "old-marker", runs / "topics" / "iid" / "local-only-seed0" / "old-marker"
    stale.write_text("x"), kept.write_text("x")
    for args, fragment in (
        (("--rerun", "fedit"), "--rerun needs --why"),
        (("--rerun", "fedavgm", "--why", "x"), "'fedavgm' is not an algorithm of the bench"),
    ):
        refused = bench("algorithms", *args, "--runs", runs, "--out", out)
        assert refused.exit_code == 2 and refused.output.count("\n") == 1 and fragment in refused.output, refused.output
    assert stale.exists(), "a refused --rerun ran nothing"
    rerun = bench("algorithms", "--rerun", "fedit", "--why", "checking the re-run path", "--runs", runs, "--out", out, "--workers", 1)
    assert rerun.exit_code == 0, rerun.output
    assert not stale.exists() and kept.exists()
    assert json.loads((runs / "topics" / "iid" / "fedit-seed1" / "bench-cell.json").read_text())["resumed"] is False
    again = (out / "algorithms.md").read_text()
    assert "the fedit rows were re-run (2 runs," in again and "checking the re-run path" in again
    assert {k: v[:-1] for k, v in table_rows(again).items()} == {k: v[:-1] for k, v in rows.items()}  # all but s / round


def test_bench_input_errors_are_one_line(suite, tmp_path):
    for args, fragment in (
        (("algorithms", "--render-only", "--runs", tmp_path / "nothing", "--out", tmp_path / "docs"), "holds no finished bench"),
        (("algorithms", suite, "--runs", tmp_path / "r"), "run `atoll bench sweep` first"),  # no learning-rate file yet
        (("algorithms", tmp_path / "missing.yaml"), "does not exist"),
        (("sweep", suite, "--tasks", "poems", "--runs", tmp_path / "s"), "unknown task 'poems'"),
    ):
        result = bench(*args)
        assert result.exit_code == 2 and result.output.count("\n") == 1 and fragment in result.output, result.output
    broken = dict(SUITE, families={"averaging": {"representative": "fedavgm", "members": ["fedit", "local-only"]}})
    suite.write_text(yaml.safe_dump(broken))
    result = bench("sweep", suite, "--runs", tmp_path / "s")
    assert result.exit_code == 2 and "representative 'fedavgm' is not one of its members" in result.output, result.output
    assert not (tmp_path / "docs").exists() and not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_a_task_may_sweep_its_own_grid(tmp_path):
    """A task's `learning_rates` replaces the suite's grid for that task only: the sweep's jobs
    and the plan it records use it, and another task keeps the suite's."""
    from atoll.report.bench.suite import load_suite
    from atoll.report.bench.sweep import sweep_jobs

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    tree = json.loads(json.dumps(SUITE))
    tree["tasks"]["wide"] = {**tree["tasks"]["topics"], "learning_rates": [0.001, 0.01, 0.1]}
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(tree))
    suite = load_suite(tmp_path / "suite.yaml")
    assert suite.grid("topics") == [0.0001, 0.05] and suite.grid("wide") == [0.001, 0.01, 0.1]
    jobs = sweep_jobs(suite, ["topics", "wide"], tmp_path / "runs", [])
    assert sorted(lr for (task, *_, lr) in jobs if task == "wide") == [0.001, 0.01, 0.1]
    assert sorted(lr for (task, *_, lr) in jobs if task == "topics") == [0.0001, 0.05]
    assert all(f"train.lr={lr}" in job.overrides for (_, _, _, lr), job in jobs.items())


def test_sweep_extend_runs_only_the_rates_without_a_score(suite, tmp_path):
    """`--extend`: a grid grown past its edge runs only the new learning rates; the scores the file
    already holds (same sweep seed, every partition) are kept, chosen from, and their cost counted."""
    earlier = {
        "chosen": {"topics": {"averaging": 0.0001}},
        "scores": {"topics": {"averaging": {"0.0001": {"iid": 1.0}}, "_cost": {"runs": 1, "cpu_minutes": 0.5}}},
        "seed": 0,
    }
    (tmp_path / "learning-rates.yaml").write_text(yaml.safe_dump(earlier))
    result = bench("sweep", suite, "--runs", tmp_path / "s", "--workers", 1, "--extend")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "s" / "topics" / "iid").iterdir()) == ["fedit-lr0.05"]  # 0.0001 not re-run
    written = yaml.safe_load((tmp_path / "learning-rates.yaml").read_text())
    table = written["scores"]["topics"]["averaging"]
    assert table["0.0001"] == {"iid": 1.0} and set(table["0.05"]) == {"iid"}
    assert written["chosen"]["topics"]["averaging"] == 0.0001  # the kept score is chosen from (ties keep the first)
    assert written["scores"]["topics"]["_cost"]["runs"] == 2
    refused = bench("sweep", suite, "--runs", tmp_path / "t", "--extend", "--set", "train.batch_size=8")
    assert refused.exit_code == 2 and "--extend keeps scores measured without --set" in refused.output, refused.output
