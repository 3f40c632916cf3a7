"""`atoll bench algorithms`: the comparison table, its majority-class reference and re-rendering."""

import json
from types import SimpleNamespace

import numpy as np

from atoll.experiment import Splits, majority_rates


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
    """`atoll bench algorithms ...` through the CLI."""
    from typer.testing import CliRunner

    from atoll.cli import app

    return CliRunner().invoke(app, ["bench", "algorithms", *map(str, args)])


def test_comparison_table_runs_every_cell_and_rerenders_identically(tmp_path):
    extra = [
        "model.name=tiny-bert",
        "data.source=synthetic-cls",
        "data.max_examples=400",
        "data.test_size=80",
        "federation.clients=4",
        "federation.rounds=2",
        "train.local_steps=2",
        "train.batch_size=16",
        "eval.every=1",
    ]
    runs, out = tmp_path / "runs", tmp_path / "docs"
    config = tmp_path / "defaults.yaml"
    config.write_text("{}\n")
    sets = [item for value in extra for item in ("--set", value)]
    result = bench(
        config,
        "--algorithms",
        "fedit,local-only",
        "--partitions",
        "iid",
        "--seeds",
        2,
        "--workers",
        1,
        "--target",
        0.0,
        "--out",
        out,
        "--runs",
        runs,
        *sets,
    )
    assert result.exit_code == 0, result.output
    path = out / "algorithms.md"
    table = path.read_text()
    results = json.loads((out / "algorithms.json").read_text())
    assert set(results) == {f"iid/{a}/{s}" for a in ("fedit", "local-only") for s in (0, 1)}
    summaries = {
        key: json.loads((runs / "iid" / f"{key.split('/')[1]}-seed{key.split('/')[2]}" / "summary.json").read_text()) for key in results
    }
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines() if line.startswith("| ")}
    # target 0 is reached at the first evaluated round: 1 for fedit; local-only has no global model,
    # so its global metric (the mean of the clients' own models) exists at the final round only
    for algorithm, first in (("fedit", "1.0"), ("local-only", "2.0")):
        finals = [summaries[f"iid/{algorithm}/{s}"]["final_global"]["accuracy"] for s in (0, 1)]
        mean, std = np.mean(finals), np.std(finals, ddof=1)
        assert rows[algorithm][0] == f"{mean:.3f} ± {std:.3f}"
        assert rows[algorithm][2] == f"{first} (2/2)"
    assert rows["local-only"][3] == rows["local-only"][4] == "0.00"
    assert float(rows["fedit"][3]) > 0 and rows["fedit"][3] == rows["fedit"][4]
    majority = [summaries[f"iid/fedit/{s}"]["majority_class_rate"] for s in (0, 1)]
    local = [summaries[f"iid/fedit/{s}"]["local_majority_rate"] for s in (0, 1)]
    reference = rows["*majority class (constant predictor)*"]
    assert reference[0] == f"{np.mean(majority):.3f} ± {np.std(majority, ddof=1):.3f}"
    assert reference[1] == f"{np.mean(local):.3f} ± {np.std(local, ddof=1):.3f}"
    assert (out / "algorithms.png").stat().st_size > 0
    before = table
    (out / "algorithms.md").unlink()
    rendered = bench("--render-only", "--runs", runs, "--out", out)
    assert rendered.exit_code == 0, rendered.output
    assert (out / "algorithms.md").read_text() == before

    # --rerun: the fedit cells run again (fresh directories, same seeds: same numbers), local-only
    # is left alone, and the table says what was re-run and why
    stale, kept = runs / "iid" / "fedit-seed0" / "old-marker", runs / "iid" / "local-only-seed0" / "old-marker"
    stale.write_text("x"), kept.write_text("x")
    for args, fragment in (
        (("--rerun", "fedit"), "--rerun needs --why"),
        (("--rerun", "fedavgm", "--why", "x"), "'fedavgm' is not an algorithm of the bench"),
    ):
        refused = bench(*args, "--runs", runs, "--out", out)
        assert refused.exit_code == 2 and refused.output.count("\n") == 1 and fragment in refused.output, refused.output
    assert stale.exists(), "a refused --rerun ran nothing"
    rerun = bench("--rerun", "fedit", "--why", "checking the re-run path", "--runs", runs, "--out", out)
    assert rerun.exit_code == 0, rerun.output
    assert not stale.exists() and kept.exists() and (runs / "iid" / "fedit-seed0" / "summary.json").is_file()
    again = (out / "algorithms.md").read_text()
    assert "the fedit rows were re-run (2 runs," in again and "checking the re-run path" in again
    assert [line for line in again.splitlines() if line.startswith("| ")] == [line for line in before.splitlines() if line.startswith("| ")]


def test_render_only_without_a_finished_bench_is_one_line(tmp_path):
    result = bench("--render-only", "--runs", tmp_path / "nothing", "--out", tmp_path / "docs")
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "holds no finished bench" in result.output
    assert not (tmp_path / "docs").exists()
