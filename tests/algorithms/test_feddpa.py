"""FedDPA: two live adapters mixed per instance, a private local adapter, FedAvg of the global one."""

import dataclasses
import itertools
import math

import pytest
import torch

from atoll.algorithms import get_algorithm
from atoll.algorithms.catalog import FedDPAParams
from atoll.algorithms.feddpa import LOCAL, FedDPAClient
from atoll.config import config_with
from atoll.data.batching import collate
from atoll.experiment import build
from atoll.fl.base import BaseClient, ServerContext
from atoll.fl.state import AdapterState, LoRAFactors, Update
from atoll.fl.store import ClientStore
from atoll.models.branches import PRIMARY, BranchHost, ExampleGates
from atoll.models.dual import instance_weights
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides


def random_state(seed, rank=4, d=7, k=5):
    gen = torch.Generator().manual_seed(seed)
    lora = {m: LoRAFactors(torch.randn(rank, k, generator=gen), torch.randn(d, rank, generator=gen), 2.0) for m in ("q", "v")}
    return AdapterState(lora, {"head.weight": torch.randn(3, d, generator=gen)})


def perturbed(state, seed, size=0.2):
    gen = torch.Generator().manual_seed(seed)
    return state.map_tensors(lambda t: t + size * torch.randn(t.shape, generator=gen))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    config = config_with(tiny_overrides(tmp_path_factory.mktemp("runs"), **{"algorithm.name": "feddpa", "train.local_steps": 2}))
    exp = build(config)
    yield exp
    exp.close()


def logits(exp, indices, gating=None):
    batch = collate(exp.workbench.data, indices, exp.workbench.pad_id, "classification")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        if gating is None:
            return exp.workbench.model(**inputs).logits
        with BranchHost.of(exp.workbench).engaged(gating):
            return exp.workbench.model(**inputs).logits


def test_server_is_fedavg_of_the_global_adapters_in_any_order():
    config = config_with(["federation.clients=4", "algorithm.name=feddpa"])
    cls = get_algorithm("feddpa")
    sizes = [10, 20, 30, 40]
    states = [random_state(i) for i in range(4)]
    results = []
    for order in itertools.permutations(range(4)):
        server = cls(ServerContext(config, sizes, [4] * 4, lambda rank: random_state(99)), cls.Params())
        server.aggregate(1, [Update(i, sizes[i], states[i]) for i in order])
        results.append(server.global_state)
    for name in ("q", "v"):
        expected = sum(n / 100 * s.lora[name].B for n, s in zip(sizes, states, strict=True))
        assert torch.allclose(results[0].lora[name].B, expected, atol=1e-6)
        for other in results[1:]:
            assert torch.allclose(other.lora[name].A, results[0].lora[name].A, atol=1e-6)
            assert torch.allclose(other.lora[name].B, results[0].lora[name].B, atol=1e-6)


def test_identical_global_adapters_give_that_adapter_back():
    """When every sampled client (3 of 4, unequal example counts) uploads the same global adapter,
    the server's global adapter is that input: A, B, scale and the head. The local adapters are
    never uploaded, so nothing of them can reach the server."""
    config = config_with(["federation.clients=4", "algorithm.name=feddpa"])
    cls = get_algorithm("feddpa")
    sizes = [5, 15, 30, 50]
    server = cls(ServerContext(config, sizes, [4] * 4, lambda rank: random_state(99)), cls.Params())
    same = random_state(7)
    server.aggregate(1, [Update(i, sizes[i], same.clone()) for i in (3, 0, 2)])
    result = server.global_state
    assert set(result.lora) == set(same.lora) and set(result.extra) == set(same.extra)
    for name, factors in same.lora.items():
        assert torch.allclose(result.lora[name].A, factors.A, rtol=1e-6, atol=1e-6)
        assert torch.allclose(result.lora[name].B, factors.B, rtol=1e-6, atol=1e-6)
        assert result.lora[name].scale == factors.scale
    assert torch.allclose(result.extra["head.weight"], same.extra["head.weight"], rtol=1e-6, atol=1e-6)
    download = server.configure(2, 1)
    assert torch.allclose(download.lora["q"].B, same.lora["q"].B, rtol=1e-6, atol=1e-6), "clients download the aggregate"


def test_two_live_adapters_are_mixed_per_instance_not_interpolated(experiment):
    bench = experiment.workbench
    host = BranchHost.of(bench)
    global_state = perturbed(bench.initial_state(), 1)
    local = {
        name: LoRAFactors(f.A + 0.5 * torch.randn_like(f.A), 0.3 * torch.randn_like(f.B), f.scale) for name, f in global_state.lora.items()
    }
    indices = experiment.splits.global_test[:4]
    bench.load(AdapterState(local, global_state.extra))
    local_only = logits(experiment, indices)
    bench.load(global_state)
    global_only = logits(experiment, indices)
    host.write_lora(LOCAL, local)
    alpha = torch.tensor([0.0, 1.0, 0.5, 0.25])
    mixed = logits(experiment, indices, ExampleGates({PRIMARY: 1 - alpha, LOCAL: alpha}))
    assert torch.equal(mixed[0], global_only[0]), "alpha = 0 must be the global adapter alone, exactly"
    assert torch.allclose(mixed[1], local_only[1], atol=1e-6), "alpha = 1 must be the local adapter alone"
    assert not torch.allclose(mixed[2], global_only[2], atol=1e-4)
    assert torch.equal(logits(experiment, indices), global_only), "outside the engaged block the model is plain"

    # at one layer: y = W0 x + (1 - a) s B_g A_g x + a s B_l A_l x (the alpha/r scale on both)
    name = next(iter(local))
    layer = host.layers[name]
    x = torch.randn(4, 3, global_state.lora[name].A.shape[1])
    with torch.no_grad(), host.engaged(ExampleGates({PRIMARY: 1 - alpha, LOCAL: alpha})):
        out = layer(x)
    base = layer.get_base_layer()(x)
    a = alpha[:, None, None]
    expected = base + (1 - a) * (x @ global_state.lora[name].delta().T) + a * (x @ local[name].delta().T)
    assert torch.allclose(out, expected, atol=1e-5)
    # a parameter-level interpolation of the factors is a different function
    interpolated = LoRAFactors(
        0.5 * (global_state.lora[name].A + local[name].A), 0.5 * (global_state.lora[name].B + local[name].B), local[name].scale
    )
    shortcut = base + x @ interpolated.delta().T
    assert (out[2] - shortcut[2]).abs().max() > 1e-3


def test_alpha_is_the_clipped_scaled_mean_cosine_similarity():
    gen = torch.Generator().manual_seed(0)
    references = torch.randn(5, 16, generator=gen)
    inputs = torch.cat([references[:2] * 3.0, -references[:2], torch.randn(4, 16, generator=gen)])
    cosine = torch.nn.functional.cosine_similarity(inputs[:, None, :], references[None, :, :], dim=-1).mean(1)
    for lam in (0.0, 0.5, 1.0, 10.0):
        alpha = instance_weights(inputs, references, lam)
        assert alpha.shape == (8,)
        assert torch.all((alpha >= 0) & (alpha <= 1))
        assert torch.allclose(alpha, (lam * cosine).clamp(0, 1), atol=1e-6)
    assert torch.all(instance_weights(-references, references, 1.0) == 0), "negative similarity clips to 0"
    assert torch.all(instance_weights(references, references, 10.0) == 1), "high similarity clips to 1"


def test_lambda_zero_evaluates_exactly_like_the_global_adapter(experiment):
    context = dataclasses.replace(experiment.clients[0].context, store=ClientStore())
    client = FedDPAClient(context, FedDPAParams(lambda_scale=0.0))
    download = perturbed(experiment.workbench.initial_state(), 3)
    client.run(1, download)
    mixed = client.evaluate(download)
    experiment.workbench.load(download)
    plain = experiment.workbench.evaluate(context.test_indices)
    assert mixed.pop("alpha") == 0.0
    assert mixed == plain


def test_local_adapter_is_private_and_global_training_ignores_it(experiment):
    context = dataclasses.replace(experiment.clients[1].context, store=ClientStore())
    download = perturbed(experiment.workbench.initial_state(), 4)
    plain = BaseClient(context, FedDPAParams()).run(1, download)  # what FedIT would upload
    client = FedDPAClient(context, FedDPAParams())
    update = client.run(1, download)
    assert set(update.state.lora) == set(download.lora) and set(update.state.extra) == set(download.extra)
    for key, tensor in update.state.to_tensors().items():
        assert torch.equal(tensor, plain.state.to_tensors()[key]), f"the global update of '{key}' depends on the local adapter"
    local, _ = client.stored_local()
    assert local is not None and set(local) == set(download.lora)
    uploaded = list(update.state.to_tensors().values())
    for name, factors in local.items():
        assert not any(t.shape == factors.B.shape and torch.equal(t, factors.B) for t in uploaded), "local adapter leaked into the upload"
        assert not torch.equal(factors.B, update.state.lora[name].B), "the local adapter did not train"
    metrics = client.evaluate(download)
    assert 0.0 <= metrics["alpha"] <= 1.0 and math.isfinite(metrics["loss"])


def test_one_clients_local_adapter_never_reaches_the_next(experiment):
    download = perturbed(experiment.workbench.initial_state(), 5)
    store = ClientStore()
    alone = FedDPAClient(dataclasses.replace(experiment.clients[2].context, store=store), FedDPAParams())
    alone_update = alone.run(1, download)
    alone_local, _ = alone.stored_local()
    alone_metrics = alone.evaluate(download)

    shared = ClientStore()
    first = FedDPAClient(dataclasses.replace(experiment.clients[3].context, store=shared), FedDPAParams())
    second = FedDPAClient(dataclasses.replace(experiment.clients[2].context, store=shared), FedDPAParams())
    first.run(1, perturbed(download, 6))
    first.evaluate(download)  # the first client's local adapter is now live in the model
    update = second.run(1, download)
    local, _ = second.stored_local()
    first.evaluate(download)
    metrics = second.evaluate(download)
    for key, tensor in alone_update.state.to_tensors().items():
        assert torch.equal(update.state.to_tensors()[key], tensor)
    for name in local:
        assert torch.equal(local[name].A, alone_local[name].A) and torch.equal(local[name].B, alone_local[name].B)
    assert metrics == alone_metrics


def test_finetune_variant_trains_the_local_adapter_once_per_global(experiment):
    context = dataclasses.replace(experiment.clients[0].context, store=ClientStore())
    client = FedDPAClient(context, FedDPAParams(variant="finetune", local_steps=2))
    download = perturbed(experiment.workbench.initial_state(), 7)
    update = client.run(1, download)
    assert context.store.get(0) is None, "FedDPA-F trains no local adapter during the rounds"
    first = client.evaluate(download)
    local, digest = client.stored_local()
    assert digest is not None and not torch.equal(next(iter(local.values())).B, next(iter(download.lora.values())).B)
    assert client.evaluate(download) == first
    assert client.stored_local()[1] == digest, "the same global must not be fine-tuned twice"
    client.evaluate(update.state)
    assert client.stored_local()[1] != digest, "a new global gets a new fine-tune"


def test_end_to_end_feddpa_both_variants(tmp_path):
    for variant in ("iterative", "finetune"):
        overrides = tiny_overrides(
            tmp_path / variant,
            **{"algorithm.name": "feddpa", "algorithm.variant": variant, "train.local_steps": 2, "data.max_examples": 400},
        )
        _, summary = start_run(config_with(overrides), Progress())
        assert summary["final_global"] and all(math.isfinite(v) for v in summary["final_global"].values())
        local = summary["final_local"]
        assert math.isfinite(local["accuracy"]) and math.isfinite(local["loss"])
        assert 0.0 < local["alpha"] <= 1.0
