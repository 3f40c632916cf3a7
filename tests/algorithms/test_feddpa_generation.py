"""FedDPA on a causal LM: a(x) is computed once per prompt and kept through cached generation."""

import dataclasses

import pytest
import torch

from atoll.algorithms.catalog import FedDPAParams
from atoll.algorithms.feddpa import LOCAL, FedDPAClient
from atoll.config import config_with
from atoll.data.batching import prompt_batch
from atoll.experiment import build
from atoll.fl.store import ClientStore
from atoll.models.branches import BranchHost
from atoll.models.dual import InstanceGate, reference_representations
from conftest import tiny_overrides


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    config = config_with(
        tiny_overrides(
            tmp_path_factory.mktemp("runs"),
            **{
                "algorithm.name": "feddpa",
                "model.name": "tiny-llama",
                "data.source": "synthetic-sft",
                "partition.name": "iid",
                "data.max_examples": 200,
                "train.local_steps": 2,
                "train.batch_size": 8,
            },
        )
    )
    exp = build(config)
    yield exp
    exp.close()


def generate(bench, indices, gate=None):
    batch = prompt_batch(bench.data, indices, bench.pad_id)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=bench.pad_id)
    with torch.no_grad():
        if gate is None:
            return bench.model.generate(**batch, **kwargs)
        with BranchHost.of(bench).engaged(gate):
            return bench.model.generate(**batch, **kwargs)


def test_weights_are_computed_once_per_prompt_batch(experiment):
    bench = experiment.workbench
    host = BranchHost.of(bench)
    context = dataclasses.replace(experiment.clients[0].context, store=ClientStore())
    client = FedDPAClient(context, FedDPAParams())
    download = experiment.server.configure(1, 0)
    update = client.run(1, download)
    local, _ = client.stored_local()
    bench.load(update.state)
    host.write_lora(LOCAL, local)
    references = reference_representations(host, bench, client.references(), LOCAL)
    indices = experiment.splits.global_test[:3]

    calls = []
    original = host.representation
    host.representation = lambda *a, **k: calls.append(a[0].shape) or original(*a, **k)
    try:
        gate = InstanceGate(LOCAL, references, 0.5)
        mixed = generate(bench, indices, gate)
    finally:
        del host.representation
    assert len(calls) == 1 and calls[0][0] == 3, "one representation pass for the prompts, none per new token"
    assert len(gate.seen) == 1 and torch.all((gate.alpha >= 0) & (gate.alpha <= 1))

    silent = InstanceGate(LOCAL, references, 0.0)  # a(x) = 0: exactly the global adapter's generation
    assert torch.equal(generate(bench, indices, silent), generate(bench, indices))
    assert mixed.shape[0] == 3
