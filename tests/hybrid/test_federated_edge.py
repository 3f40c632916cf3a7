"""The edge's adapter comes from a federated run: with edge.run and edge.client the edge loads that
client's adapter (clustered-lora: its cluster's adapter at its own rank) and task.source
client-test scores the client's own held-out examples, reproducing the run's own local metric;
a dense base delta beside an adapter (FlexLoRA, FLoRA, ...) is applied and switched off with it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from atoll.cli import app
from atoll.hybrid.config import build_hybrid_config
from atoll.hybrid.edge import EdgeModel
from atoll.hybrid.loading import load_causal_lm


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory):
    """clustered-lora on atoll-tiny (pretrained, so its next-token accuracy is far from 0), 2 clients
    of ranks 4 and 8, personal adapters exported."""
    from atoll.config import config_with
    from atoll.dispatch import start_run
    from atoll.report.progress import Progress

    root = tmp_path_factory.mktemp("federated-edge")
    overrides = {
        "model.name": "atoll-tiny",
        "model.max_length": 96,
        "model.lora.rank_cycle": "[4, 8]",
        "data.source": "synthetic-sft",
        "data.max_examples": 120,
        "partition.name": "iid",
        "federation.clients": 2,
        "federation.rounds": 2,
        "algorithm.name": "clustered-lora",
        "train.local_steps": 2,
        "train.batch_size": 8,
        "train.lr": 0.005,
        "eval.local": "final",
        "eval.batch_size": 64,
        "run.export_personal": "true",
        "run.plots": "false",
        "run.dir": str(root / "run"),
    }
    run_dir, summary = start_run(config_with([f"{k}={v}" for k, v in overrides.items()]), Progress())
    return run_dir.path, summary


def test_the_edge_of_each_client_reproduces_its_local_metric_from_the_federated_run(federated_run, tmp_path):
    """Edge-only next-token accuracy on client-test (every held-out example, every reference
    token), weighted by each client's held-out examples, equals the run's final local
    token_accuracy: the right adapter (its rank), the right split, the run's formatting."""
    from atoll.hybrid.evaluate import run_eval

    run, run_summary = federated_run
    weighted, total = 0.0, 0
    for client, rank in ((0, 4), (1, 8)):
        config = build_hybrid_config(
            {
                "edge": {"run": str(run), "client": client},
                "fusion": {"methods": ["edge"]},
                "task": {"source": "client-test", "max_examples": 1000, "max_new_tokens": 96},
                "run": {"dir": str(tmp_path / f"client{client}")},
            }
        )
        _, summary = run_eval(config, echo=lambda line: None)
        assert summary["adapter"] == str(run / "personal" / f"client_{client}")
        assert json.loads((run / "personal" / f"client_{client}" / "adapter_config.json").read_text())["r"] == rank
        (edge,) = summary["methods"]
        weighted += edge["examples"] * edge["next_token_accuracy"]
        total += edge["examples"]
    assert weighted / total > 0.1  # a model that predicts nothing right would match anything
    assert weighted / total == pytest.approx(run_summary["final_local"]["token_accuracy"], abs=1e-9)


@pytest.fixture(scope="module")
def adapter_with_base_delta(tiny_pair, tmp_path_factory):
    """The tiny edge's PEFT adapter plus a random dense delta on two linear modules."""
    directory = tmp_path_factory.mktemp("base-delta") / "adapter"
    shutil.copytree(tiny_pair["adapter"], directory)
    from safetensors.torch import save_file

    base, _ = load_causal_lm(str(tiny_pair["edge"]))
    generator = torch.Generator().manual_seed(5)
    deltas = {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
        weight = base.get_submodule(name).weight
        deltas[name] = 0.5 * torch.randn(weight.shape, generator=generator)
    save_file(deltas, str(directory / "base_delta.safetensors"))
    return directory, deltas


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)


def test_a_base_delta_is_added_to_the_tuned_edge_and_removed_from_the_untuned_one(tiny_pair, adapter_with_base_delta):
    from peft import PeftModel

    directory, deltas = adapter_with_base_delta
    model, tokenizer = load_causal_lm(str(tiny_pair["edge"]), adapter=str(directory))
    edge = EdgeModel(model, tokenizer)
    ids = edge.encode("What is this text about? rain")
    step = edge.start(ids, with_base=True)
    step = edge.advance(7)  # through the KV caches too
    # by hand: W0 + delta merged into the weights, then the same PEFT adapter
    merged, _ = load_causal_lm(str(tiny_pair["edge"]))
    with torch.no_grad():
        for name, delta in deltas.items():
            merged.get_submodule(name).weight += delta
    expected_tuned = _logprobs(PeftModel.from_pretrained(merged, str(tiny_pair["adapter"])), ids + [7])
    pristine, _ = load_causal_lm(str(tiny_pair["edge"]))
    expected_base = _logprobs(pristine, ids + [7])
    assert torch.allclose(step.tuned, expected_tuned, atol=1e-4)
    assert torch.allclose(step.base, expected_base, atol=1e-4)
    assert not torch.allclose(step.tuned, _logprobs(PeftModel.from_pretrained(pristine, str(tiny_pair["adapter"])), ids + [7]), atol=1e-2)


@pytest.mark.parametrize(
    "tree, message",
    [
        ({"edge": {"run": "somewhere"}, "fusion": {"methods": ["edge"]}}, "edge.run needs edge.client"),
        ({"edge": {"client": 1}, "fusion": {"methods": ["edge"]}}, "edge.client needs edge.run"),
        ({"task": {"source": "client-test"}, "fusion": {"methods": ["edge"]}}, "client-test needs edge.run"),
        ({"edge": {"run": "RUN", "client": 0, "model": "atoll-edge"}, "fusion": {"methods": ["edge"]}}, "differs from the model of run"),
        ({"edge": {"run": "RUN", "client": 9}, "fusion": {"methods": ["edge"]}}, "is not a client of run"),
        ({"edge": {"run": "NOT_A_RUN", "client": 0}, "fusion": {"methods": ["edge"]}}, "is not an atoll run directory"),
    ],
)
def test_bad_edge_run_settings_fail_in_one_line_before_anything_is_written(federated_run, tmp_path, tree, message):
    import yaml

    run, _ = federated_run
    text = json.dumps(tree).replace('"RUN"', json.dumps(str(run))).replace('"NOT_A_RUN"', json.dumps(str(tmp_path)))
    tree = json.loads(text)
    tree["run"] = {"root": str(tmp_path / "runs")}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["hybrid", "eval", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "runs").exists()


def test_a_base_delta_for_another_model_is_refused_in_one_line(tiny_pair, tmp_path):
    from safetensors.torch import save_file

    from atoll.errors import ModelError

    directory = tmp_path / "adapter"
    shutil.copytree(tiny_pair["adapter"], directory)
    save_file({"model.layers.0.self_attn.q_proj": torch.zeros(3, 3)}, str(directory / "base_delta.safetensors"))
    with pytest.raises(ModelError, match="has shape"):
        load_causal_lm(str(tiny_pair["edge"]), adapter=str(directory))
