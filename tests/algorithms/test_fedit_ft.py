"""FedIT + fine-tuning: FedAvg rounds, a personal adapter fine-tuned from the global and kept."""

import dataclasses
import itertools
import math

import pytest
import torch

from atoll.algorithms import get_algorithm
from atoll.algorithms._personal import state_digest, unpack
from atoll.algorithms.catalog import FedITFineTuneParams
from atoll.algorithms.fedit_ft import FedITFineTuneClient
from atoll.config import config_with
from atoll.experiment import build
from atoll.fl.base import ServerContext
from atoll.fl.state import AdapterState, LoRAFactors, Update
from atoll.fl.store import ClientStore
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides


def random_state(seed, rank=4, d=7, k=5):
    gen = torch.Generator().manual_seed(seed)
    lora = {m: LoRAFactors(torch.randn(rank, k, generator=gen), torch.randn(d, rank, generator=gen), 2.0) for m in ("q", "v")}
    return AdapterState(lora, {"head.weight": torch.randn(3, d, generator=gen)})


def test_server_is_fedavg_in_any_order():
    cls = get_algorithm("fedit-ft")
    config = config_with(["federation.clients=3", "algorithm.name=fedit-ft"])
    sizes = [10, 30, 60]
    states = [random_state(i) for i in range(3)]
    results = []
    for order in itertools.permutations(range(3)):
        server = cls(ServerContext(config, sizes, [4] * 3, lambda rank: random_state(9)), cls.Params())
        server.aggregate(1, [Update(i, sizes[i], states[i]) for i in order])
        results.append(server.global_state)
    expected = sum(n / 100 * s.extra["head.weight"] for n, s in zip(sizes, states, strict=True))
    assert torch.allclose(results[0].extra["head.weight"], expected, atol=1e-6)
    for other in results[1:]:
        for name in ("q", "v"):
            assert torch.allclose(other.lora[name].B, results[0].lora[name].B, atol=1e-6)


def test_identical_uploads_give_that_input_back():
    """When every sampled client (3 of 4, unequal example counts) uploads the same adapter, the
    global adapter (what the personal fine-tunes start from) is that input: A, B, scale, head."""
    cls = get_algorithm("fedit-ft")
    config = config_with(["federation.clients=4", "algorithm.name=fedit-ft"])
    sizes = [5, 15, 30, 50]
    server = cls(ServerContext(config, sizes, [4] * 4, lambda rank: random_state(9)), cls.Params())
    same = random_state(4)
    server.aggregate(1, [Update(i, sizes[i], same.clone()) for i in (1, 3, 0)])
    result = server.global_state
    assert set(result.lora) == set(same.lora) and set(result.extra) == set(same.extra)
    for name, factors in same.lora.items():
        assert torch.allclose(result.lora[name].A, factors.A, rtol=1e-6, atol=1e-6)
        assert torch.allclose(result.lora[name].B, factors.B, rtol=1e-6, atol=1e-6)
        assert result.lora[name].scale == factors.scale
    assert torch.allclose(result.extra["head.weight"], same.extra["head.weight"], rtol=1e-6, atol=1e-6)
    assert server.configure(2, 2) is server.global_state


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    config = config_with(
        tiny_overrides(tmp_path_factory.mktemp("runs"), **{"algorithm.name": "fedit-ft", "train.local_steps": 2, "data.max_examples": 400})
    )
    exp = build(config)
    yield exp
    exp.close()


def perturbed(state, seed):
    gen = torch.Generator().manual_seed(seed)
    return state.map_tensors(lambda t: t + 0.2 * torch.randn(t.shape, generator=gen))


def test_local_evaluation_uses_the_kept_personal_adapter(experiment):
    context = dataclasses.replace(experiment.clients[0].context, store=ClientStore())
    client = FedITFineTuneClient(context, FedITFineTuneParams(finetune_steps=3))
    download = perturbed(experiment.workbench.initial_state(), 1)
    metrics = client.evaluate(download)
    stored = context.store.get(0)
    personal, digest = unpack(stored)
    assert digest == state_digest(download)
    assert not torch.equal(personal.extra["classifier.weight"], download.extra["classifier.weight"]), "no fine-tune happened"
    experiment.workbench.load(personal)
    assert experiment.workbench.evaluate(context.test_indices) == metrics, "local metrics come from the personal adapter"
    experiment.workbench.load(download)
    assert experiment.workbench.evaluate(context.test_indices) != metrics
    assert client.evaluate(download) == metrics
    assert context.store.get(0) is stored, "the same global is fine-tuned once"
    client.evaluate(perturbed(download, 2))
    assert unpack(context.store.get(0))[1] != digest, "a new global gets a new personal adapter"


def test_personal_adapters_do_not_leak_between_clients(experiment):
    download = perturbed(experiment.workbench.initial_state(), 3)
    alone = FedITFineTuneClient(dataclasses.replace(experiment.clients[1].context, store=ClientStore()), FedITFineTuneParams())
    alone_metrics = alone.evaluate(download)
    alone_state = alone.context.store.get(1)
    shared = ClientStore()
    first = FedITFineTuneClient(dataclasses.replace(experiment.clients[2].context, store=shared), FedITFineTuneParams())
    second = FedITFineTuneClient(dataclasses.replace(experiment.clients[1].context, store=shared), FedITFineTuneParams())
    first.evaluate(download)
    assert second.evaluate(download) == alone_metrics
    for key, tensor in alone_state.items():
        assert torch.equal(shared.get(1)[key], tensor)
    assert not torch.equal(shared.get(2)["extra.classifier.weight"], shared.get(1)["extra.classifier.weight"])


def test_end_to_end_global_and_personal_metrics(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"algorithm.name": "fedit-ft", "train.local_steps": 2, "data.max_examples": 300})
    _, summary = start_run(config_with(overrides), Progress())
    assert all(math.isfinite(v) for v in summary["final_global"].values())
    assert math.isfinite(summary["final_local"]["accuracy"]) and math.isfinite(summary["final_local"]["loss"])
