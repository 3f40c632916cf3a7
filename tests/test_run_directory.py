"""What a run writes reproduces the run, with no atoll code on the model path.

For every algorithm that writes a global adapter, the base model is loaded with plain transformers
from its directory, ``adapter/base_delta.safetensors`` (where written) is added to its weights with
plain torch, ``adapter/`` is loaded with ``PeftModel.from_pretrained``, and the model is evaluated
on the run's global test split by a loop written here: accuracy and macro-F1 equal the run's
``final_global``, the loss agrees to 1e-6. Personal adapters exported with ``run.export_personal``
give each client's local metrics back the same way. The base is a plain BERT directory
(``plain_bert``), so the base weights too come from transformers alone.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from atoll.cli import app
from atoll.config import load_config
from conftest import tiny_overrides
from helpers import Examples, algorithm_case, algorithm_names, global_test_examples, local_test_examples, read_records, read_summary

LOSS_TOLERANCE = 1e-6
# algorithms whose global model is not one LoRA adapter: no adapter/ (their clients' own models are the result)
NO_GLOBAL_ADAPTER = {"fedsa-lora", "local-only", "fedlease", "clustered-lora"}
# algorithms that merge updates into the base weights: adapter/base_delta.safetensors holds them (README)
WRITES_BASE_DELTA = {"flora", "fedex-lora", "flexlora", "fedmomentum", "ilora"}
# personalized algorithms whose personal model is one LoRA: run.export_personal writes personal/client_K
EXPORTS_PERSONAL = ["fedsa-lora", "fedit-ft", "local-only", "clustered-lora"]


def plain_base(model_dir: Path, base_delta: Path | None = None):
    """The base model as transformers loads it, plus the run's dense base delta if there is one."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    if base_delta is not None:
        with torch.no_grad():
            for module, delta in load_file(str(base_delta)).items():
                weight = model.get_submodule(module).weight
                assert weight.shape == delta.shape, module
                weight += delta
    return model


@functools.lru_cache(maxsize=2)
def plain_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def plain_metrics(model, model_dir: Path, examples: Examples, max_length: int) -> dict[str, float]:
    """Accuracy, macro-F1 over the classes present and mean cross-entropy, in plain torch."""
    tokenizer = plain_tokenizer(str(model_dir))
    model.eval()
    labels = torch.tensor(examples.labels)
    logits = []
    with torch.no_grad():
        for start in range(0, len(examples.texts), 64):
            batch = tokenizer(examples.texts[start : start + 64], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            logits.append(model(**batch).logits.float())
    logits = torch.cat(logits)
    predicted = logits.argmax(-1)
    f1 = []
    for label in sorted(set(examples.labels)):
        hits = int(((predicted == label) & (labels == label)).sum())
        precision = hits / max(1, int((predicted == label).sum()))
        recall = hits / int((labels == label).sum())
        f1.append(0.0 if hits == 0 else 2 * precision * recall / (precision + recall))
    return {
        "accuracy": int((predicted == labels).sum()) / len(examples.labels),
        "macro_f1": float(np.mean(f1)),
        "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
    }


def assert_reproduces(metrics: dict[str, float], reported: dict[str, float], where: str) -> None:
    assert metrics["accuracy"] == pytest.approx(reported["accuracy"], abs=1e-12), where
    if "macro_f1" in reported:
        assert metrics["macro_f1"] == pytest.approx(reported["macro_f1"], abs=1e-9), where
    assert metrics["loss"] == pytest.approx(reported["loss"], abs=LOSS_TOLERANCE), where


@pytest.mark.parametrize("name", algorithm_names())
def test_the_global_adapter_reproduces_final_global_with_transformers_and_peft_alone(reference_runs, plain_bert, name):
    from peft import PeftModel

    run = reference_runs.get(**algorithm_case(name, plain_bert))
    adapter = run / "adapter"
    if name in NO_GLOBAL_ADAPTER:
        assert not adapter.exists(), f"{name} has no global LoRA model, yet wrote adapter/"
        return
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    delta = adapter / "base_delta.safetensors"
    assert delta.is_file() == (name in WRITES_BASE_DELTA), f"{name}: base_delta.safetensors written: {delta.is_file()}"
    config = load_config(run / "config.yaml")
    model = PeftModel.from_pretrained(plain_base(plain_bert, delta if delta.is_file() else None), str(adapter))
    metrics = plain_metrics(model, plain_bert, global_test_examples(config), config.model.max_length)
    assert_reproduces(metrics, read_summary(run)["final_global"], name)


@pytest.mark.parametrize("name", ["flexlora", "hetlora"])
def test_rslora_with_mixed_ranks_reloads_to_final_global(reference_runs, plain_bert, name):
    """rsLoRA scales a rank-r adapter by alpha/sqrt(r): with clients of ranks 8 and 4, what the run
    saved and PEFT rescales on loading (use_rslora in adapter_config.json) still gives final_global."""
    from peft import PeftModel

    run = reference_runs.get(**{**algorithm_case(name, plain_bert), "model.lora.rslora": "true"})
    adapter = run / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_rslora"] is True
    delta = adapter / "base_delta.safetensors"
    config = load_config(run / "config.yaml")
    assert sorted({config.rank_of(c) for c in range(config.federation.clients)}) == [4, 8]
    model = PeftModel.from_pretrained(plain_base(plain_bert, delta if delta.is_file() else None), str(adapter))
    metrics = plain_metrics(model, plain_bert, global_test_examples(config), config.model.max_length)
    assert_reproduces(metrics, read_summary(run)["final_global"], name)


@pytest.mark.parametrize("name", EXPORTS_PERSONAL)
def test_each_exported_personal_adapter_reproduces_its_clients_local_metrics(reference_runs, plain_bert, name):
    from peft import PeftModel

    run = reference_runs.get(**{**algorithm_case(name, plain_bert), "run.export_personal": "true", "eval.local": "always"})
    config = load_config(run / "config.yaml")
    last = read_records(run)[-1]
    exported = sorted(path.name for path in (run / "personal").iterdir())
    assert exported == [f"client_{c}" for c in range(config.federation.clients)]
    weighted = {"accuracy": 0.0, "loss": 0.0}
    total = 0
    for client_id in range(config.federation.clients):
        examples = local_test_examples(config, client_id)
        directory = run / "personal" / f"client_{client_id}"
        assert not (directory / "base_delta.safetensors").exists()
        model = PeftModel.from_pretrained(plain_base(plain_bert), str(directory))
        metrics = plain_metrics(model, plain_bert, examples, config.model.max_length)
        assert metrics["accuracy"] == pytest.approx(last["local"]["per_client"][str(client_id)], abs=1e-12), client_id
        for key in weighted:
            weighted[key] += len(examples.labels) * metrics[key]
        total += len(examples.labels)
    if name == "fedsa-lora":  # A is the shared global one, B each client's own
        from safetensors.torch import load_file

        files = [load_file(str(run / "personal" / f"client_{c}" / "adapter_model.safetensors")) for c in range(config.federation.clients)]
        assert all(torch.equal(f[k], files[0][k]) for f in files[1:] for k in files[0] if "lora_A" in k)
        assert any(not torch.equal(f[k], files[0][k]) for f in files[1:] for k in files[0] if "lora_B" in k)
    final_local = read_summary(run)["final_local"]
    assert weighted["accuracy"] / total == pytest.approx(final_local["accuracy"], abs=1e-9)
    assert weighted["loss"] / total == pytest.approx(final_local["loss"], abs=LOSS_TOLERANCE)


@pytest.mark.parametrize("name", ["fedlease", "feddpa"])
def test_export_of_a_personal_model_that_is_not_one_lora_is_refused_before_anything_is_written(tmp_path, name):
    """FedLEASE's personal model is a routed mixture of experts, FedDPA's a gated pair: one line,
    exit 2, no run directory."""
    config = tmp_path / "defaults.yaml"
    config.write_text("{}\n")
    args = ["run", "--quiet", str(config)]
    for item in tiny_overrides(tmp_path / "runs", **{"algorithm.name": name, "run.export_personal": "true"}):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "export_personal" in lines[0] and name in lines[0], result.output
    assert not (tmp_path / "runs").exists()
