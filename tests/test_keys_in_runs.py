"""Config keys the README and `atoll config` advertise, each shown to change what a run does (so a
key that stopped working fails here): checkpoints kept, the client store's RAM budget, the LR decay
per round, the minimum partition size, the local test fraction, the minimum online clients of a
sync round, rsLoRA with mixed ranks, bfloat16 byte counts, the tokenised-data cache, the initial
evaluation, keys whose only visible effect is on training (weight decay, length grouping, LoRA
dropout, gradient accumulation, warmup, gradient clipping), local epochs, the evaluation subset,
the text column, random initialisation, torch threads, FedAsync's mixing weight, FedBuff's server
step, and the realistic engine's event cap and timeline size."""

from __future__ import annotations

import math
import tempfile

import pytest
import yaml

from safetensors.torch import load_file

from atoll.config import config_with
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides
from helpers import (
    assert_same_length,
    algorithm_case,
    client_labels,
    client_learning_rate,
    client_split_sizes,
    global_test_examples,
    lora_scales,
    read_records,
    read_summary,
    task_kind,
    threads_while_building,
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


def test_shards_per_client_bounds_the_classes_a_client_holds(tmp_path):
    """McMahan et al.'s label-sorted shards: with one shard per client, a client holds at most two
    classes (a shard may straddle a class boundary); with three, some client holds all three."""

    def labels(shards):
        values = {"partition.name": "shards", "partition.shards_per_client": shards, "federation.clients": 6}
        return [len(classes) for classes in client_labels(config_with(tiny_overrides(tmp_path, **values)))]

    assert max(labels(1)) <= 2 and min(labels(1)) == 1
    assert max(labels(3)) == 3


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


@pytest.mark.parametrize("rslora, alpha", [(False, 16.0), (True, 16.0), (False, 24.0)])
def test_each_rank_gets_its_own_scale_alpha_over_r_or_over_sqrt_r(tmp_path, rslora, alpha):
    values = {"algorithm.name": "flexlora", "model.lora.rank_cycle": "[4, 8]", "model.lora.rslora": rslora, "model.lora.alpha": alpha}
    root = math.sqrt if rslora else (lambda r: r)
    assert lora_scales(config_with(tiny_overrides(tmp_path, **values))) == pytest.approx({4: alpha / root(4), 8: alpha / root(8)})


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
    [
        ("train.weight_decay", 0.5),
        ("train.group_by_length", "false"),
        ("model.lora.dropout", 0.3),
        ("train.grad_accum", 2),
        ("train.warmup_steps", 3),
        ("train.max_grad_norm", 1e-7),
    ],
)
def test_training_keys_change_what_is_trained(tmp_path, reference_runs, key, value):
    """Each changes the optimisation from the first round on (same seed, same data otherwise)."""
    run_dir, _ = start_run(config_with(tiny_overrides(tmp_path, **{key: value, "run.plots": "false"})), Progress())
    mine, plain = read_records(run_dir.path), read_records(reference_runs.get())
    assert_same_length(mine, plain, "metrics records")
    assert mine[0] == plain[0], "the untrained model is the same"
    assert mine[1]["train"]["loss"] != plain[1]["train"]["loss"] or mine[2]["global"] != plain[2]["global"], key


def test_local_epochs_set_the_steps_when_local_steps_is_null_and_eval_max_examples_cuts_the_global_test(tmp_path):
    """Steps per client = ceil(local_epochs * train examples / (batch_size * grad_accum)); the
    round's record sums them over clients. The global test set is cut to eval.max_examples."""
    values = {"train.local_steps": "null", "train.local_epochs": 0.5, "train.grad_accum": 2, "eval.max_examples": 25}
    values.update({"federation.rounds": 1, "eval.local": "never", "run.plots": "false"})
    config = config_with(tiny_overrides(tmp_path, **values))
    expected = sum(math.ceil(0.5 * train / (16 * 2)) for train, _ in client_split_sizes(config))
    assert expected != 4 * 4, "the default local_steps would give the same count"
    run_dir, summary = start_run(config, Progress())
    records = read_records(run_dir.path)
    assert records[1]["train"]["steps"] == expected
    assert records[0]["global"]["examples"] == records[1]["global"]["examples"] == 25
    assert summary["global_test_examples"] == 25


def test_random_init_draws_new_weights_for_a_model_directory(reference_runs, plain_bert):
    """The same directory, its saved weights against seeded random ones: the untrained model's
    global loss differs (round 0 is evaluated before any training)."""
    case = {**algorithm_case("fedit", plain_bert), "federation.rounds": 1, "eval.local": "never"}
    saved = read_records(reference_runs.get(**case))[0]["global"]
    drawn = read_records(reference_runs.get(**case, **{"model.random_init": "true"}))[0]["global"]
    assert saved["examples"] == drawn["examples"]
    assert drawn["loss"] != pytest.approx(saved["loss"], abs=1e-6)


def test_text_column_picks_the_column_the_model_reads(tmp_path):
    """A local file whose default text column ("text") is the same string for every row: read
    through it, every example looks alike and the untrained model gives every one the same logits;
    with data.text_column: body it reads the real texts."""
    import json

    words = ["river", "stone", "market", "violin", "orbit", "garden", "engine", "harbor", "pepper"]
    rows = [
        {
            "text": "nothing here",
            "body": f"{words[i % 9]} {words[(i * 7) % 9]} {i}",
            "label": ["a", "b", "c"][i % 3],
            "kind": ["even", "odd"][i % 2],
        }
        for i in range(240)
    ]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    losses = {}
    for column in ("text", "body"):
        values = {"data.source": str(source), "data.text_column": column, "data.max_examples": 240, "federation.rounds": 1}
        values.update({"train.local_steps": 1, "eval.local": "never", "run.plots": "false", "run.dir": str(tmp_path / column)})
        run_dir, _ = start_run(config_with(tiny_overrides(tmp_path, **values)), Progress())
        losses[column] = read_records(run_dir.path)[0]["global"]["loss"]
    assert losses["text"] != pytest.approx(losses["body"], abs=1e-6)
    # the label column and the global test size, as the run splits the file
    other = config_with(
        tiny_overrides(
            tmp_path, **{"data.source": str(source), "data.max_examples": 240, "data.label_column": "kind", "data.test_size": 30}
        )
    )
    assert global_test_examples(other).label_names == ["even", "odd"]
    assert len(global_test_examples(other).labels) == 30
    assert (
        len(
            global_test_examples(
                config_with(tiny_overrides(tmp_path, **{"data.source": str(source), "data.max_examples": 240, "data.test_size": 0.25}))
            ).labels
        )
        == 60
    )


def test_run_threads_sets_torchs_thread_count(tmp_path):
    import torch

    assert threads_while_building(config_with(tiny_overrides(tmp_path, **{"run.threads": 2}))) == 2
    assert torch.get_num_threads() == 1, "the helper restores one thread"


def realistic_system(tmp_path):
    system = tmp_path / "sys.yaml"
    system.write_text(
        yaml.safe_dump({"devices": {"mix": {"laptop": 1}}, "networks": {"mix": {"ethernet": 1}}, "availability": {"windows": "always"}})
    )
    return str(system)


def test_max_events_stops_the_simulation_and_timeline_clients_limits_what_is_recorded(tmp_path):
    """Dry runs (no model): the event cap ends a run early and says so; the timeline holds the
    first timeline_clients clients, and events.csv is written only when every client fits in it."""
    common = {"mode": "realistic", "system": realistic_system(tmp_path), "realistic.dry_run": "true", "federation.rounds": 3}
    outcomes = {}
    for name, extra in {"default": {}, "capped": {"realistic.max_events": 5}, "two": {"realistic.timeline_clients": 2}}.items():
        run_dir, summary = start_run(
            config_with(tiny_overrides(tmp_path, **common, **extra, **{"run.dir": str(tmp_path / name)})), Progress()
        )
        clients = {int(line.split(",")[0]) for line in (run_dir.path / "timeline.csv").read_text().splitlines()[1:]}
        outcomes[name] = (summary, clients, (run_dir.path / "events.csv").is_file())
    default, capped, two = outcomes["default"], outcomes["capped"], outcomes["two"]
    assert default[0]["stopped_by"] == "rounds" and default[0]["rounds_completed"] == 3
    assert capped[0]["stopped_by"] == "max_events" and capped[0]["rounds_completed"] < 3
    assert default[1] == {0, 1, 2, 3} and default[2], "4 clients fit in the default 40: all recorded, with events"
    assert two[1] == {0, 1} and not two[2]


@pytest.mark.parametrize(
    "paradigm, key, value",
    [("fedasync", "realistic.fedasync.alpha", 0.3), ("fedbuff", "realistic.fedbuff.server_lr", 0.3)],
)
def test_the_async_server_step_scales_the_first_update_by_its_key(tmp_path, paradigm, key, value):
    """LoRA's B starts at zero. FedAsync's first update (staleness 0, constant s) sets the global to
    (1 - alpha) x0 + alpha x1; FedBuff's first step adds server_lr times the buffer's mean change.
    So after one server update the global B with the key at 0.3 is 0.3 times the B with it at 1."""
    common = {"mode": "realistic", "system": realistic_system(tmp_path), "realistic.paradigm": paradigm, "federation.rounds": 1}
    common.update({"eval.local": "never", "eval.initial": "false", "run.plots": "false", "train.local_steps": 1})
    factors = {}
    for setting in (1.0, value):
        run_dir, summary = start_run(
            config_with(tiny_overrides(tmp_path, **common, **{key: setting, "run.dir": str(tmp_path / str(setting))})), Progress()
        )
        assert summary["rounds_completed"] == 1
        tensors = load_file(str(run_dir.path / "adapter" / "adapter_model.safetensors"))
        factors[setting] = {name: tensor for name, tensor in tensors.items() if "lora_B" in name}
    assert factors[1.0] and all(float(tensor.abs().max()) > 0 for tensor in factors[1.0].values()), "B moved in the first update"
    for name, full in factors[1.0].items():
        assert torch_close(factors[value][name], value * full), name


def torch_close(got, expected) -> bool:
    import torch

    return torch.allclose(got, expected, rtol=1e-5, atol=1e-8)


def test_data_task_reads_the_same_rows_as_the_task_asked_for(tmp_path):
    """Question/answer rows: 'auto' reads a local file's prompt and response columns as sft; data.task: math reads them as math."""
    import json

    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} and {i} make {2 * i}. #### {2 * i}"} for i in range(40)]
    source = tmp_path / "qa.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = {"model.name": "tiny-llama", "data.source": str(source), "data.max_examples": 40, "partition.name": "iid"}
    kinds = {task: task_kind(config_with(tiny_overrides(tmp_path, **common, **{"data.task": task}))) for task in ("auto", "math")}
    assert kinds == {"auto": "sft", "math": "math"}
