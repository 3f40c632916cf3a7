"""End-to-end runs of the prototype runner: learning, reproducibility, resume, outputs, baselines."""

import functools
import json
import math

import numpy as np
import pytest
import torch

from atoll.algorithms.baselines import POOLED_CLIENT
from atoll.config import config_with, load_config
from atoll.experiment import build
from atoll.report.progress import Progress
from atoll.report.rundir import RunDir
from atoll.dispatch import resume_run, start_run
from conftest import tiny_overrides
from helpers import killed_copy, read_summary, resume


def task_metrics(run_dir):
    """Every round's task metrics (timings removed) from metrics.jsonl."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("seconds", None)
        record.pop("wall_seconds", None)
        records.append(record)
    return records


def test_minilm_learns_the_synthetic_task(tmp_path):
    config = config_with(
        tiny_overrides(tmp_path, **{"model.name": "minilm", "federation.rounds": 3, "train.lr": 0.002, "train.local_steps": 5})
    )
    run_dir, summary = start_run(config, Progress())
    assert summary["final_global"]["accuracy"] > summary["majority_class_rate"] + 0.2
    assert summary["final_local"]["accuracy"] > summary["majority_class_rate"] + 0.2
    records = task_metrics(run_dir.path)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in records[1:])
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "metrics.png",
        "label_distribution.png",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ):
        assert (run_dir.path / name).is_file(), name
    assert RunDir(run_dir.path).checkpoint_rounds() == [1, 2, 3]
    assert load_config(run_dir.path / "config.yaml") == config


def test_same_seed_same_metrics_and_other_seed_differs(tmp_path, reference_runs):
    first = reference_runs.get()
    second, _ = start_run(config_with(tiny_overrides(tmp_path / "b", **{"run.plots": "false"})), Progress())
    third, _ = start_run(config_with(tiny_overrides(tmp_path / "c", seed=1, **{"run.plots": "false"})), Progress())
    assert task_metrics(first) == task_metrics(second.path)
    assert task_metrics(first) != task_metrics(third.path)


RESUMED = {"federation.rounds": 4, "federation.sample_rate": 0.5}


def test_resume_after_a_kill_ends_at_the_uninterrupted_metrics(tmp_path, reference_runs):
    """Killed after round 2's checkpoint, with round 3's metrics already written and a half-written
    line after them: resume drops what the checkpoint does not cover and ends where the
    uninterrupted run ended."""
    full = reference_runs.get(**RESUMED)
    cut = killed_copy(full, 2, tmp_path / "cut")
    with open(cut / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 4, "truncat')
    assert RunDir(cut).checkpoint_rounds() == [1, 2] and not (cut / "summary.json").exists()
    resumed_summary = resume(cut)
    assert task_metrics(cut) == task_metrics(full)
    full_summary = read_summary(full)
    assert resumed_summary["final_global"] == full_summary["final_global"]
    assert resumed_summary["final_local"] == full_summary["final_local"]
    assert RunDir(cut).checkpoint_rounds() == [1, 2, 3, 4]


def test_corrupted_checkpoint_is_refused(tmp_path, reference_runs):
    from atoll.errors import CheckpointError

    run = killed_copy(reference_runs.get(**RESUMED), 1, tmp_path / "run")
    server_file = RunDir(run).checkpoint_dir(1) / "server.safetensors"
    data = bytearray(server_file.read_bytes())
    data[-5] ^= 0xFF
    server_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        resume_run(run, Progress())


def test_local_only_keeps_personal_adapters_and_sends_nothing(tmp_path):
    config = config_with(tiny_overrides(tmp_path, **{"algorithm.name": "local-only", "federation.rounds": 2}))
    experiment = build(config)
    try:
        bench = experiment.workbench
        initial = bench.initial_state()
        first = experiment.clients[0].run(1, experiment.server.configure(1, 0))
        assert first.state.nbytes() == 0
        stored = experiment.store.get(0)
        # the next client in the same process starts from the initial adapter, not client 0's
        second_start = experiment.clients[1].compose(1, experiment.server.configure(1, 1))
        for name in initial.lora:
            assert torch.equal(second_start.lora[name].A, initial.lora[name].A)
            assert torch.equal(second_start.lora[name].B, initial.lora[name].B)
        experiment.clients[1].run(1, experiment.server.configure(1, 1))
        # client 0 resumes from its own adapter in round 2
        again = experiment.clients[0].compose(2, experiment.server.configure(2, 0))
        name = next(iter(initial.lora))
        assert torch.equal(again.lora[name].B, stored[f"lora.{name}.B"])
        assert not torch.equal(again.lora[name].B, initial.lora[name].B)
    finally:
        experiment.close()


def assert_pooled_client_holds_exactly_the_clients_training_data(experiment):
    """The centralized baseline's one client trains on the union of every client's training split
    (sorted, each index once, no test index of any kind) and has no test split of its own."""
    splits = experiment.splits
    pooled = experiment.clients[POOLED_CLIENT].context
    assert POOLED_CLIENT not in experiment.real_client_ids
    assert len(splits.client_train) == experiment.config.federation.clients
    train = pooled.train_indices
    assert np.array_equal(train, np.sort(np.concatenate(splits.client_train))), (
        "not the sorted concatenation of the clients' training splits"
    )
    assert np.array_equal(train, np.union1d(train, train)), "pooled indices are unsorted or repeated"
    assert np.array_equal(train, functools.reduce(np.union1d, splits.client_train)), "not the union of the clients' training splits"
    assert pooled.num_examples == sum(splits.client_sizes()), "an example is in two clients' training splits"
    held_out = np.concatenate([splits.global_test, *splits.client_test])
    assert held_out.size > 0 and np.intersect1d(train, held_out).size == 0, "a test example is in the pooled training data"
    assert pooled.test_indices.size == 0


def test_baselines_run_end_to_end(tmp_path):
    for name in ("local-only", "centralized"):
        config = config_with(tiny_overrides(tmp_path / name, **{"algorithm.name": name}))
        run_dir, summary = start_run(config, Progress())
        assert "accuracy" in summary["final_global"], name
        assert "accuracy" in summary["final_local"], name
        if name == "centralized":
            assert summary["bytes_up_total"] == 0
            record = task_metrics(run_dir.path)[1]
            sampled = config.federation.clients
            assert record["train"]["steps"] == sampled * config.train.local_steps
            experiment = build(config)
            try:
                assert_pooled_client_holds_exactly_the_clients_training_data(experiment)
                assert experiment.clients[POOLED_CLIENT].context.config.train.local_steps == sampled * config.train.local_steps
            finally:
                experiment.close()
        else:
            assert summary["bytes_up_total"] == 0 and not (run_dir.path / "adapter").exists()


def test_instruction_tuning_lowers_answer_loss(tmp_path):
    config = config_with(
        tiny_overrides(
            tmp_path,
            **{
                "model.name": "tiny-llama",
                "data.source": "synthetic-sft",
                "partition.name": "iid",
                "federation.rounds": 3,
                "train.local_steps": 15,
                "train.lr": 0.01,
                "model.lora.rank": 16,
                "model.lora.target_modules": "[q_proj, v_proj]",
                # a random-init base has flat output logits: the LM head is trained (and federated) too
                "model.lora.trainable_modules": "[lm_head]",
            },
        )
    )
    run_dir, summary = start_run(config, Progress())
    records = task_metrics(run_dir.path)
    assert records[0]["global"]["loss"] > 5.0
    assert records[-1]["global"]["loss"] < 1.5
    assert records[-1]["global"]["token_accuracy"] > 0.7
    assert "perplexity" in summary["final_global"]


def test_math_task_generates_and_scores(tmp_path):
    config = config_with(
        tiny_overrides(
            tmp_path,
            **{
                "model.name": "tiny-qwen2",
                "data.source": "gsm8k",
                "partition.name": "iid",
                "federation.rounds": 1,
                "train.local_steps": 2,
                "train.batch_size": 4,
                "data.max_examples": 200,
                "eval.max_generate": 8,
                "eval.max_new_tokens": 8,
                "model.max_length": 256,
            },
        )
    )
    _, summary = start_run(config, Progress())
    final = summary["final_global"]
    assert 0.0 <= final["exact_match"] <= 1.0 and final["generated"] == 8
    assert math.isfinite(final["loss"])
