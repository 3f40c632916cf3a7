"""RAVAN: exact aggregation of s_h H_h over shared frozen bases, bases from the seed, one model."""

import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import atoll.experiment
from atoll.algorithms import get_algorithm
from atoll.algorithms.ravan import PREFIX
from atoll.config import config_with
from atoll.data.batching import collate
from atoll.experiment import build
from atoll.fl.base import ServerContext
from atoll.fl.state import AdapterState, LoRAFactors, Update
from atoll.models.branches import PRIMARY, BranchHost, FixedGates
from atoll.models.ravan import RAVAN, default_head_rank, ravan_bases
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides

SHAPES = {"q": (12, 10), "v": (9, 10)}


def initial_state(rank=4):
    gen = torch.Generator().manual_seed(0)
    lora = {m: LoRAFactors(torch.randn(rank, k, generator=gen), torch.zeros(d, rank), 4.0) for m, (d, k) in SHAPES.items()}
    return AdapterState(lora, {"head.weight": torch.zeros(3, 12)})


def make_server(seed=0, **params):
    cls = get_algorithm("ravan")
    config = config_with(
        ["federation.clients=3", "algorithm.name=ravan", "model.lora.rank=4", f"seed={seed}"]
        + [f"algorithm.{k}={v}" for k, v in params.items()]
    )
    return cls(ServerContext(config, [10, 30, 60], [4] * 3, initial_state), cls.Params(**params))


def client_update(server, client, size, seed):
    gen = torch.Generator().manual_seed(seed)
    extra = {}
    for m in SHAPES:
        extra[f"{PREFIX}{m}.H"] = torch.randn(server.params.heads, server.head_rank, server.head_rank, generator=gen)
        extra[f"{PREFIX}{m}.s"] = 0.5 + torch.rand(server.params.heads, generator=gen)
    extra["head.weight"] = torch.randn(3, 12, generator=gen)
    return Update(client, size, AdapterState(extra=extra))


def heads_sum(B, A, H, s):
    return sum(s[h] * B[h] @ H[h] @ A[h] for h in range(B.shape[0]))


def test_aggregation_is_exact_and_order_free():
    server = make_server(heads=3, head_rank=2)
    updates = [client_update(server, c, n, 10 + c) for c, n in enumerate([10, 30, 60])]
    server.aggregate(1, updates)
    weights = [0.1, 0.3, 0.6]
    for m in SHAPES:
        B, A = server.bases(m)
        ideal = sum(
            p * heads_sum(B, A, u.state.extra[f"{PREFIX}{m}.H"], u.state.extra[f"{PREFIX}{m}.s"])
            for p, u in zip(weights, updates, strict=True)
        )
        H_bar, s_bar = server.ravan.extra[f"{PREFIX}{m}.H"], server.ravan.extra[f"{PREFIX}{m}.s"]
        assert torch.equal(s_bar, torch.ones(3))
        assert torch.allclose(heads_sum(B, A, H_bar, s_bar), ideal, atol=1e-5)
        # the exported PEFT LoRA (rank heads * r_h, its own alpha / r) is the same update, scale included
        exported = server.global_state.lora[m]
        assert exported.rank == 3 * 2 and exported.scale == pytest.approx(16.0 / 6)
        assert torch.allclose(exported.delta(), server.scale * ideal, atol=1e-5)
    assert server.scale == pytest.approx(16.0 / 2)
    results = []
    for order in itertools.permutations(updates):
        trial = make_server(heads=3, head_rank=2)
        trial.aggregate(1, list(order))
        results.append(trial.ravan.extra)
    for other in results[1:]:
        for key in results[0]:
            assert torch.allclose(other[key], results[0][key], atol=1e-6)


def test_identical_uploads_give_that_input_back():
    """Every sampled client uploads the same state (unequal example counts 10 / 30 / 60).

    Uploads as clients send them (folded cores s_h H_h, no scales, and the head) come back
    exactly: cores and head are the uploaded tensors, the scales are 1, and the exported PEFT LoRA
    is that adapter (delta = scale * sum_h B_h H_h A_h over the seeded bases).

    An upload that also carries scales s_h != 1 cannot come back tensor for tensor, because the
    server folds them into the cores and resets s_h to 1 by design. What holds exactly is that it
    comes back folded: H_h = s_h H_h, s_h = 1, so the adapter (the update B H A summed over heads)
    is unchanged."""
    sizes = [10, 30, 60]
    server = make_server(heads=3, head_rank=2)
    sent = client_update(server, 0, 0, 21).state
    folded = {k: v for k, v in sent.extra.items() if not k.endswith(".s")}
    for m in SHAPES:
        folded[f"{PREFIX}{m}.H"] = sent.extra[f"{PREFIX}{m}.s"][:, None, None] * sent.extra[f"{PREFIX}{m}.H"]
    upload = AdapterState(extra=folded)
    server.aggregate(1, [Update(c, n, upload.clone()) for c, n in enumerate(sizes)])
    assert set(server.ravan.extra) == set(folded) | {f"{PREFIX}{m}.s" for m in SHAPES}
    for key, tensor in folded.items():
        assert torch.allclose(server.ravan.extra[key], tensor, rtol=1e-6, atol=1e-6), key
    for m in SHAPES:
        assert torch.equal(server.ravan.extra[f"{PREFIX}{m}.s"], torch.ones(3))
        B, A = server.bases(m)
        expected = server.scale * heads_sum(B, A, folded[f"{PREFIX}{m}.H"], torch.ones(3))
        assert torch.allclose(server.global_state.lora[m].delta(), expected, atol=1e-5)
    assert torch.allclose(server.global_state.extra["head.weight"], folded["head.weight"], rtol=1e-6, atol=1e-6)
    assert server.configure(2, 1) is server.ravan, "the next download is the aggregate"

    # with scales in the upload: the same adapter, folded
    scaled = make_server(heads=3, head_rank=2)
    scaled.aggregate(1, [Update(c, n, sent.clone()) for c, n in enumerate(sizes)])
    for m in SHAPES:
        H, s = sent.extra[f"{PREFIX}{m}.H"], sent.extra[f"{PREFIX}{m}.s"]
        assert not torch.allclose(s, torch.ones(3)), "the scales must differ from 1 for this check to mean anything"
        assert torch.allclose(scaled.ravan.extra[f"{PREFIX}{m}.H"], s[:, None, None] * H, rtol=1e-6, atol=1e-6)
        assert torch.equal(scaled.ravan.extra[f"{PREFIX}{m}.s"], torch.ones(3))
        B, A = scaled.bases(m)
        assert torch.allclose(scaled.global_state.lora[m].delta(), scaled.scale * heads_sum(B, A, H, s), atol=1e-5)
    assert torch.allclose(scaled.ravan.extra["head.weight"], sent.extra["head.weight"], rtol=1e-6, atol=1e-6)


def test_asynchronous_mixing_works_on_the_folded_cores():
    from atoll.fl.base import AsyncRule

    server = make_server(heads=3, head_rank=2)
    server.aggregate(1, [client_update(server, 0, 10, 1)])
    before = {k: v.clone() for k, v in server.ravan.extra.items()}
    update = client_update(server, 1, 30, 2)
    server.aggregate_async(2, update, 0, AsyncRule(alpha=0.25))
    for m in SHAPES:
        H, s = update.state.extra[f"{PREFIX}{m}.H"], update.state.extra[f"{PREFIX}{m}.s"]
        expected = 0.75 * before[f"{PREFIX}{m}.H"] + 0.25 * s[:, None, None] * H
        assert torch.allclose(server.ravan.extra[f"{PREFIX}{m}.H"], expected, atol=1e-6)
        assert torch.equal(server.ravan.extra[f"{PREFIX}{m}.s"], torch.ones(3))
        B, A = server.bases(m)
        ideal = server.scale * heads_sum(B, A, server.ravan.extra[f"{PREFIX}{m}.H"], torch.ones(3))
        assert torch.allclose(server.global_state.lora[m].delta(), ideal, atol=1e-5), "the export follows the mixed cores"


def test_bases_come_from_the_seed_and_are_never_sent():
    B, A = ravan_bases(0, "q", 12, 10, 3, 2)
    again_B, again_A = ravan_bases(0, "q", 12, 10, 3, 2)
    other_B, _ = ravan_bases(1, "q", 12, 10, 3, 2)
    assert torch.equal(B, again_B) and torch.equal(A, again_A) and not torch.allclose(B, other_B)
    stacked = B.permute(1, 0, 2).reshape(12, 6)  # heads jointly orthonormal: 3 * 2 <= 12
    assert torch.allclose(stacked.T @ stacked, torch.eye(6), atol=1e-5)
    rows = A.reshape(6, 10)
    assert torch.allclose(rows @ rows.T, torch.eye(6), atol=1e-5)
    server = make_server(heads=3, head_rank=2)
    download = server.configure(1, 0)
    assert download.lora == {} and all(k.endswith((".H", ".s")) or k == "head.weight" for k in download.extra)
    assert download.numel() == sum(3 * 2 * 2 + 3 for _ in SHAPES) + 3 * 12  # cores and scales per module, the head
    assert default_head_rank(8, 4, [(64, 64)]) == 16  # 4 * 16^2 = 8 * (64 + 64): LoRA's parameter count


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    calls = []
    original = atoll.experiment.load_base_model

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    atoll.experiment.load_base_model = counting
    try:
        config = config_with(
            tiny_overrides(tmp_path_factory.mktemp("runs"), **{"algorithm.name": "ravan", "train.local_steps": 2, "data.max_examples": 400})
        )
        exp = build(config)
    finally:
        atoll.experiment.load_base_model = original
    exp.base_model_loads = len(calls)
    yield exp
    exp.close()


def test_one_base_model_and_parameters_on_its_device(experiment):
    assert experiment.base_model_loads == 1
    assert not any(isinstance(v, torch.nn.Module) for v in vars(experiment.server).values()), "the server holds no model"
    host = BranchHost.of(experiment.workbench)
    for layer, branch in host.sets[RAVAN].items():
        device = host.base_layer(layer).weight.device
        assert all(t.device == device for t in (branch.B, branch.A, branch.H, branch.s))


def test_live_layer_computes_the_scaled_head_sum(experiment):
    host = BranchHost.of(experiment.workbench)
    layer = next(iter(host.layers))
    branch = host.sets[RAVAN][layer]
    gen = torch.Generator().manual_seed(1)
    tensors = {k: torch.randn(v.shape, generator=gen) for k, v in host.read(RAVAN).items()}
    host.write(RAVAN, tensors)
    H, s = tensors[f"{layer}.H"], tensors[f"{layer}.s"]
    x = torch.randn(2, 3, branch.A.shape[2])
    with torch.no_grad(), host.engaged(FixedGates({PRIMARY: 0.0, RAVAN: 1.0})):
        out = host.layers[layer](x)
    expected = host.base_layer(layer)(x) + branch.scale * x @ heads_sum(branch.B, branch.A, H, s).T
    assert torch.allclose(out, expected, atol=1e-5)


def test_training_moves_only_cores_and_scales_and_global_export_matches(experiment):
    server = experiment.server
    host = BranchHost.of(experiment.workbench)
    bases = {layer: (b.B.clone(), b.A.clone()) for layer, b in host.sets[RAVAN].items()}
    updates = [experiment.clients[c].run(1, server.configure(1, c)) for c in (0, 1)]
    for update in updates:
        assert update.state.lora == {} and not any(k.endswith(".s") for k in update.state.extra)
        assert any(not torch.equal(t, torch.zeros_like(t)) for k, t in update.state.extra.items() if k.endswith(".H"))
    trained = host.read(RAVAN)  # client 1 ran last: it uploads s_h H_h directly
    for layer in host.layers:
        folded = trained[f"{layer}.s"][:, None, None] * trained[f"{layer}.H"]
        assert torch.equal(updates[1].state.extra[f"{PREFIX}{layer}.H"], folded)
        assert not torch.equal(trained[f"{layer}.s"], torch.ones_like(trained[f"{layer}.s"])), "the head scales train"
    for layer, branch in host.sets[RAVAN].items():
        assert torch.equal(branch.B, bases[layer][0]) and torch.equal(branch.A, bases[layer][1])
    server.aggregate(1, updates)
    # the global model evaluated through the exported PEFT LoRA equals the live RAVAN branches
    bench = experiment.workbench
    batch = collate(bench.data, experiment.splits.global_test[:8], bench.pad_id, "classification")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    bench.load(server.global_state)
    with torch.no_grad():
        exported = bench.model(**inputs).logits
    experiment.clients[0].load(server.configure(2, 0))
    with torch.no_grad(), host.engaged(FixedGates({PRIMARY: 0.0, RAVAN: 1.0})):
        live = bench.model(**inputs).logits
    with torch.no_grad(), host.engaged(FixedGates({PRIMARY: 0.0})):
        without = bench.model(**inputs).logits
    assert torch.allclose(exported, live, atol=1e-5)
    assert (live - without).abs().max() > 1e-4, "the trained cores must change the output"


def test_end_to_end_ravan_exports_a_peft_lora(tmp_path):
    overrides = tiny_overrides(tmp_path, **{"algorithm.name": "ravan", "train.local_steps": 2, "data.max_examples": 300})
    run_dir, summary = start_run(config_with(overrides), Progress())
    assert all(math.isfinite(v) for v in summary["final_global"].values())
    assert math.isfinite(summary["final_local"]["accuracy"]) and math.isfinite(summary["final_local"]["loss"])
    adapter = json.loads((run_dir.path / "adapter" / "adapter_config.json").read_text())
    head_rank = default_head_rank(8, 4, [(64, 64)])
    assert adapter["r"] == 4 * head_rank
    exported = load_file(str(run_dir.path / "adapter" / "adapter_model.safetensors"))
    layers = sum("lora_A" in k for k in exported)
    head = sum(t.numel() for k, t in exported.items() if "lora_" not in k)
    assert layers > 0 and head > 0
    # clients train 4 cores H (r_h x r_h) and 4 scales per layer plus the task head, not the exported LoRA
    assert summary["trainable_parameters"] == layers * 4 * (head_rank * head_rank + 1) + head
