"""`atoll pretrain`: a tiny model end to end, plain-transformers loading, determinism and exact resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

TINY = {
    "name": "atoll-test",
    "seed": 0,
    "corpus": {"sources": ["shakespeare"], "max_characters": 60000},
    "tokenizer": {"vocab_size": 300},
    "model": {"hidden_size": 32, "intermediate_size": 64, "layers": 1, "heads": 2, "kv_heads": 1, "max_position": 64},
    "train": {"steps": 150, "batch_size": 4, "seq_len": 32, "lr": 0.005, "warmup_steps": 5, "checkpoint_every": 5, "eval_max_tokens": 2000},
}


def _write(root: Path, **changes) -> Path:
    tree = json.loads(json.dumps(TINY))
    tree.update(changes)
    tree["work_dir"] = str(root / "work")
    tree["out_dir"] = str(root / "model")
    path = root / "pretrain.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted in-process run."""
    from atoll.lm.config import load_pretrain_config
    from atoll.lm.pipeline import pretrain

    root = tmp_path_factory.mktemp("pretrain-reference")
    result = pretrain(load_pretrain_config(_write(root)), "atoll pretrain pretrain.yaml", message=lambda text: None)
    return result


def test_model_directory_loads_with_plain_transformers_and_beats_unigram(reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(reference.out_dir)
    tokenizer = AutoTokenizer.from_pretrained(reference.out_dir)
    assert model.config.model_type == "llama" and model.dtype == torch.float16
    ids = tokenizer("The king", return_tensors="pt")
    assert ids.input_ids[0, 0] == tokenizer.bos_token_id  # as every pretraining sequence starts
    output = model.float().generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] == ids.input_ids.shape[1] + 5
    numbers = json.loads((reference.out_dir / "atoll_card.json").read_text())
    assert numbers["heldout_perplexity"] < numbers["unigram_perplexity"] < numbers["vocab_size"]
    assert numbers["tokens_seen"] == 150 * 4 * 32 and numbers["steps"] == 150
    card = (reference.out_dir / "README.md").read_text()
    assert f"{numbers['heldout_perplexity']:.2f}" in card and "CC-BY 2.5" in card and "atoll pretrain pretrain.yaml" in card


def test_killed_run_resumes_to_the_same_weights(reference, tmp_path):
    """A real SIGKILL of an `atoll pretrain` process mid-run, then the same run again (in this process, to
    save a second start-up): bit-identical to the uninterrupted run."""
    config = _write(tmp_path)
    command = [sys.executable, "-m", "atoll", "pretrain", str(config), "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "work" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    step = torch.load(checkpoint, weights_only=False)["step"]
    assert 0 < step < 150 and not (tmp_path / "model").exists()  # killed mid-run, nothing half-written
    from atoll.lm.config import load_pretrain_config
    from atoll.lm.pipeline import pretrain

    messages = []
    pretrain(load_pretrain_config(config), "atoll pretrain pretrain.yaml", message=messages.append)  # the same command, again
    assert f"resuming from step {step:,} in {tmp_path / 'work'}" in messages
    resumed = load_file(tmp_path / "model" / "model.safetensors")
    expected = load_file(reference.out_dir / "model.safetensors")
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert (tmp_path / "model" / "tokenizer.json").read_text() == (reference.out_dir / "tokenizer.json").read_text()


def test_seed_decides_initialisation_and_batches():
    from atoll.lm.config import PretrainConfig
    from atoll.lm.train import batch_at, build_model

    class Vocab:
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self):
            return 300

    tokens = torch.arange(5000).numpy()
    assert torch.equal(batch_at(tokens, 7, 0, 4, 16), batch_at(tokens, 7, 0, 4, 16))
    assert not torch.equal(batch_at(tokens, 7, 0, 4, 16), batch_at(tokens, 7, 1, 4, 16))
    assert not torch.equal(batch_at(tokens, 7, 0, 4, 16), batch_at(tokens, 8, 0, 4, 16))
    config = PretrainConfig.model_validate(TINY)
    first, again = build_model(config, Vocab()), build_model(config, Vocab())
    other = build_model(config.model_copy(update={"seed": 1}), Vocab())
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(first.state_dict()[weight], again.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])


def test_a_checkpoint_of_another_config_is_refused(reference, tmp_path):
    from atoll.cli import app

    work = reference.out_dir.parent / "work"
    config = _write(tmp_path, seed=3)
    tree = yaml.safe_load(config.read_text())
    tree["work_dir"] = str(work)
    config.write_text(yaml.safe_dump(tree))
    before = (work / "config.json").read_text()
    result = CliRunner().invoke(app, ["pretrain", str(config), "--quiet"])
    assert result.exit_code == 2 and "belongs to a different pretraining config" in result.output
    assert (work / "config.json").read_text() == before  # refused before anything was written
    assert result.output.strip().splitlines()[-1].startswith("atoll: checkpoint error")


def test_bad_pretraining_config_is_one_line(tmp_path):
    from atoll.cli import app

    config = _write(tmp_path)
    result = CliRunner().invoke(app, ["pretrain", str(config), "--set", "model.heads=3"])
    assert result.exit_code == 2 and "do not divide" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["pretrain", str(config), "--set", "train.stepz=3"])
    assert result.exit_code == 2 and "unknown key 'train.stepz'" in result.output
