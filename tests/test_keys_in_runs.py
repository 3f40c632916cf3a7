"""Config keys the README and `atoll config` advertise, each shown to change what a run does (so a
key that stopped working fails here): checkpoints kept, the client store's RAM budget, the LR decay
per round, the minimum partition size, the local test fraction, the minimum online clients of a
sync round, rsLoRA with mixed ranks, bfloat16 byte counts, the tokenised-data cache, the initial
evaluation, and keys whose only visible effect is on training (weight decay, length grouping,
LoRA dropout)."""

from __future__ import annotations

import math
import tempfile

import pytest
import yaml

from atoll.config import config_with
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides
from helpers import (
    assert_same_length,
    client_learning_rate,
    client_split_sizes,
    lora_scales,
    read_records,
    read_summary,
)


class SpillWatcher(Progress):
    """Counts, at the end of every round, the client-store files spilled to disk under ``root``."""

    def __init__(self, root):
        self.root = root
        self.seen: list[int] = []

    def round_end(self, round, record):
        self.seen.append(len(list(self.root.glob("atoll-store-*/client-*.safetensors"))))


def test_keep_checkpoints_and_a_tiny_store_budget_change_the_files_not_the_results(tmp_path, reference_runs, monkeypatch):
    """FedSA-LoRA keeps a B per client in the client store. A 100-byte RAM budget spills all but
    the latest client to disk every round (the files appear in the temp directory) and the run ends
    at the same metrics; keep_checkpoints=2 leaves only the newest two round checkpoints."""
    extra = {"algorithm.name": "fedsa-lora", "federation.rounds": 4}
    reference = reference_runs.get(**extra)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the store spills
    watcher = SpillWatcher(scratch)
    values = {**extra, "run.keep_checkpoints": 2, "run.store_budget_mb": 0.0001, "run.plots": "false", "run.dir": str(tmp_path / "run")}
    start_run(config_with(tiny_overrides(tmp_path, **values)), watcher)
    assert watcher.seen == [3, 3, 3, 3], "three of four clients' B spilled to disk after every round"
    assert sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir()) == ["round-00003", "round-00004"]
    assert sorted(path.name for path in (reference / "checkpoints").iterdir()) == [f"round-0000{r}" for r in range(1, 5)]
    assert read_records(tmp_path / "run") == read_records(reference)


def test_round_decay_multiplies_the_learning_rate_every_round(tmp_path, reference_runs):
    config = config_with(tiny_overrides(tmp_path, **{"train.lr": 0.005, "train.round_decay": 0.5}))
    assert [client_learning_rate(config, 0, r) for r in (1, 2, 3)] == pytest.approx([0.005, 0.0025, 0.00125])
    run_dir, _ = start_run(config_with(tiny_overrides(tmp_path, **{"train.round_decay": 0.5, "run.plots": "false"})), Progress())
    decayed, plain = read_records(run_dir.path), read_records(reference_runs.get())
    assert decayed[1]["train"] == plain[1]["train"], "round 1 trains at the full rate"
    assert decayed[2]["train"]["loss"] != plain[2]["train"]["loss"], "round 2 trains at half of it"


def test_min_examples_gives_every_client_at_least_that_many(tmp_path):
    def smallest(minimum):
        config = config_with(
            tiny_overrides(
                tmp_path,
                **{"partition.alpha": 0.3, "federation.clients": 10, "partition.min_examples": minimum, "data.local_test_fraction": 0.0},
            )
        )
        return min(train + test for train, test in client_split_sizes(config))

    assert smallest(1) < 20, "the skewed partition must give some client fewer than 20 for the check to mean anything"
    assert smallest(20) >= 20


def test_local_test_fraction_sets_each_clients_test_split(tmp_path):
    half = client_split_sizes(config_with(tiny_overrides(tmp_path, **{"data.local_test_fraction": 0.5})))
    assert all(test == min(round(0.5 * (train + test)), train + test - 1) for train, test in half)
    run_dir, summary = start_run(
        config_with(tiny_overrides(tmp_path, **{"data.local_test_fraction": 0.0, "federation.rounds": 1, "run.plots": "false"})), Progress()
    )
    assert summary["final_local"] == {} and "accuracy" in summary["final_global"]
    assert all(not record.get("local", {}).get("per_client") for record in read_records(run_dir.path)), "a client was evaluated locally"


def test_sync_min_clients_holds_the_first_round_until_that_many_are_online(tmp_path):
    """A trace: clients 0 and 1 online from the start, 2 from 500 s, 3 from 900 s. With
    min_clients 4 the first round waits for all four; with the default 1 it starts at once with
    the two that are online."""
    trace = tmp_path / "trace.csv"
    trace.write_text("client,start,end\n0,0,1000000\n1,0,1000000\n2,500,1000000\n3,900,1000000\n")
    system = tmp_path / "sys.yaml"
    system.write_text(
        yaml.safe_dump(
            {
                "devices": {"mix": {"laptop": 1}},
                "networks": {"mix": {"ethernet": 1}},
                "availability": {"windows": "trace", "trace": {"path": str(trace)}},
            }
        )
    )
    first_rounds = {}
    for minimum in (1, 4):
        values = {"mode": "realistic", "system": str(system), "federation.rounds": 1, "realistic.sync.min_clients": minimum}
        values.update({"eval.local": "never", "run.plots": "false", "run.dir": str(tmp_path / f"min-{minimum}")})
        run_dir, _ = start_run(config_with(tiny_overrides(tmp_path, **values)), Progress())
        first_rounds[minimum] = read_records(run_dir.path)[1]
    assert first_rounds[1]["clients"] == [0, 1]
    assert first_rounds[4]["clients"] == [0, 1, 2, 3]
    assert first_rounds[4]["virtual_time"] > 900 > first_rounds[1]["virtual_time"]


@pytest.mark.parametrize("rslora", [False, True])
def test_each_rank_gets_its_own_scale_alpha_over_r_or_over_sqrt_r(tmp_path, rslora):
    config = config_with(
        tiny_overrides(tmp_path, **{"algorithm.name": "flexlora", "model.lora.rank_cycle": "[4, 8]", "model.lora.rslora": rslora})
    )
    root = math.sqrt if rslora else (lambda r: r)
    assert lora_scales(config) == pytest.approx({4: 16.0 / root(4), 8: 16.0 / root(8)})


def test_bfloat16_halves_the_bytes_of_what_is_kept_in_bfloat16_and_dry_runs_charge_the_same(tmp_path):
    """On a bfloat16 base PEFT keeps the LoRA factors in float32; the classifier head (a copy of a
    base module) is bfloat16. Real runs charge the serialised messages; dry runs charge the payload
    4 x LoRA parameters + 2 x head parameters (tiny-bert, rank 8: 512 LoRA parameters per rank and
    195 head parameters), within the messages' headers (names, scales) of the real bytes."""
    system = tmp_path / "sys.yaml"
    system.write_text(
        yaml.safe_dump({"devices": {"mix": {"laptop": 1}}, "networks": {"mix": {"ethernet": 1}}, "availability": {"windows": "always"}})
    )
    per_client = {"float32": 4 * 512 * 8 + 4 * 195, "bfloat16": 4 * 512 * 8 + 2 * 195}
    for dtype, payload in per_client.items():
        common = {"model.dtype": dtype, "federation.rounds": 1, "eval.local": "never", "run.plots": "false", "mode": "realistic"}
        dry = read_summary(
            start_run(
                config_with(
                    tiny_overrides(
                        tmp_path,
                        **common,
                        **{"system": str(system), "realistic.dry_run": "true", "run.dir": str(tmp_path / f"dry-{dtype}")},
                    )
                ),
                Progress(),
            )[0].path
        )
        assert dry["bytes_up_total"] == dry["bytes_down_total"] == 4 * payload, dtype
        real = read_summary(
            start_run(
                config_with(tiny_overrides(tmp_path, **common, **{"system": str(system), "run.dir": str(tmp_path / f"real-{dtype}")})),
                Progress(),
            )[0].path
        )
        assert 4 * payload < real["bytes_up_total"] < 1.1 * 4 * payload, (dtype, real["bytes_up_total"])


def test_cache_dir_holds_the_tokenised_data_and_initial_false_skips_round_zero(tmp_path):
    cache = tmp_path / "cache"
    run_dir, _ = start_run(
        config_with(
            tiny_overrides(
                tmp_path, **{"data.cache_dir": str(cache), "eval.initial": "false", "federation.rounds": 1, "run.plots": "false"}
            )
        ),
        Progress(),
    )
    assert list(cache.glob("tokens-*.npz")), "no tokenised data in data.cache_dir"
    records = read_records(run_dir.path)
    assert records[0]["round"] == 0 and not records[0]["global"], "round 0 was evaluated"
    assert records[1]["global"]


@pytest.mark.parametrize(
    "key, value",
    [("train.weight_decay", 0.5), ("train.group_by_length", "false"), ("model.lora.dropout", 0.3)],
)
def test_training_keys_change_what_is_trained(tmp_path, reference_runs, key, value):
    """Each changes the optimisation from the first round on (same seed, same data otherwise)."""
    run_dir, _ = start_run(config_with(tiny_overrides(tmp_path, **{key: value, "run.plots": "false"})), Progress())
    mine, plain = read_records(run_dir.path), read_records(reference_runs.get())
    assert_same_length(mine, plain, "metrics records")
    assert mine[0] == plain[0], "the untrained model is the same"
    assert mine[1]["train"]["loss"] != plain[1]["train"]["loss"] or mine[2]["global"] != plain[2]["global"], key
