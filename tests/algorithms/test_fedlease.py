"""FedLEASE: clusters from trained B, cluster-wise FedAvg, the adaptive top-M router, end to end."""

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch

from atoll.algorithms import get_algorithm
from atoll.algorithms.fedlease import CLUSTER_KEY, FedLEASEClient, average_linkage, b_distances, choose_clusters, expert_key, silhouette
from atoll.config import config_with
from atoll.errors import ConfigError, UpdateError
from atoll.experiment import build
from atoll.fl.base import ServerContext
from atoll.fl.state import AdapterState, LoRAFactors, Update
from atoll.fl.store import ClientStore
from atoll.models.branches import BranchHost
from atoll.models.moe import ROUTER, adaptive_top_m, expert_name, router_init, slot_experts
from atoll.report.progress import Progress
from atoll.dispatch import resume_run, start_run
from conftest import tiny_overrides

D, K, R = 6, 5, 2


def initial_state(rank=R):
    gen = torch.Generator().manual_seed(99)
    lora = {m: LoRAFactors(torch.randn(rank, K, generator=gen), torch.zeros(D, rank), 2.0) for m in ("q", "v")}
    return AdapterState(lora, {"head.weight": torch.zeros(3, D)})


def grouped_states(groups, seed=0, noise=0.05):
    """Warm-up adapters whose B matrices fall into the given groups (one direction per group)."""
    gen = torch.Generator().manual_seed(seed)
    directions = {g: {m: torch.randn(D, R, generator=gen) for m in ("q", "v")} for g in sorted(set(groups))}
    states = []
    for group in groups:
        lora = {
            m: LoRAFactors(torch.randn(R, K, generator=gen), directions[group][m] + noise * torch.randn(D, R, generator=gen), 2.0)
            for m in ("q", "v")
        }
        states.append(AdapterState(lora, {"head.weight": torch.randn(3, D, generator=gen)}))
    return states


def make_server(clients, **params):
    cls = get_algorithm("fedlease")
    config = config_with([f"federation.clients={clients}", "algorithm.name=fedlease"] + [f"algorithm.{k}={v}" for k, v in params.items()])
    sizes = [10 + 5 * i for i in range(clients)]
    return cls(ServerContext(config, sizes, [R] * clients, initial_state), cls.Params(**params)), sizes


def same_partition(a, b):
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


def test_clusters_are_a_deterministic_function_of_the_trained_B():
    groups = [0, 1, 2, 0, 1, 2, 0, 1, 2]
    states = grouped_states(groups)
    labels = choose_clusters(b_distances([{m: s.lora[m].B for m in s.lora} for s in states]), max_clusters=8)
    assert same_partition(labels, groups) and labels.max() == 2
    assert labels[0] == 0, "labels are numbered by each cluster's smallest client id"
    # the server finds the same clusters whatever order the warm-up uploads arrive in
    found = []
    for order in ([0, 1, 2, 3, 4, 5, 6, 7, 8], [8, 3, 5, 0, 7, 1, 6, 2, 4]):
        server, sizes = make_server(9, max_clusters=8)
        server.aggregate(1, [Update(i, sizes[i], states[i]) for i in order])
        found.append(server.clusters)
    assert found[0] == found[1] == labels.tolist()
    # the cap on clusters is respected; too few clients give one cluster
    assert choose_clusters(b_distances([{m: s.lora[m].B for m in s.lora} for s in states]), max_clusters=2).max() == 1
    assert choose_clusters(np.zeros((2, 2)), max_clusters=8).tolist() == [0, 0]


def test_untrained_B_cannot_be_clustered():
    server, sizes = make_server(4)
    untrained = [initial_state() for _ in range(4)]
    with pytest.raises(UpdateError, match="B = 0"):
        server.aggregate(1, [Update(i, sizes[i], s) for i, s in enumerate(untrained)])


def test_rounds_must_outlast_the_warmup():
    with pytest.raises(ConfigError, match="warm-up"):
        make_server(4, warmup_rounds=5)  # federation.rounds defaults to 5


def test_linkage_and_silhouette_on_a_known_example():
    distances = np.array([[0, 1, 6, 7], [1, 0, 5, 6], [6, 5, 0, 2], [7, 6, 2, 0]], dtype=float)
    levels = average_linkage(distances)
    assert levels[4].tolist() == [0, 1, 2, 3] and levels[1].tolist() == [0, 0, 0, 0]
    assert levels[3].tolist() == [0, 0, 1, 2] and levels[2].tolist() == [0, 0, 1, 1]
    # point 0: a = 1, b = (6 + 7) / 2; point 2: a = 2, b = 5.5
    expected = np.mean([(6.5 - 1) / 6.5, (5.5 - 1) / 5.5, (5.5 - 2) / 5.5, (6.5 - 2) / 6.5])
    assert silhouette(distances, levels[2]) == pytest.approx(expected)


def allocated_server(groups=(0, 1, 0, 1), warmup_rounds=1):
    server, sizes = make_server(len(groups), warmup_rounds=warmup_rounds)
    states = grouped_states(list(groups), seed=3)
    server.aggregate(1, [Update(i, sizes[i], s) for i, s in enumerate(states)])
    return server, sizes, states


def test_experts_start_as_size_weighted_cluster_means():
    server, sizes, states = allocated_server()
    assert server.clusters == [0, 1, 0, 1] and server.num_experts == 2
    for cluster, members in ((0, [0, 2]), (1, [1, 3])):
        total = sum(sizes[c] for c in members)
        for m in ("q", "v"):
            expected = sum(sizes[c] / total * states[c].lora[m].B for c in members)
            assert torch.allclose(server.experts[cluster].lora[m].B, expected, atol=1e-6)
        router = server.experts[cluster].extra["router.q.weight"]
        assert router.shape == (2 * 2 - 1, K)
    download = server.configure(2, 1)
    assert int(download.control[CLUSTER_KEY]) == 1
    assert set(download.lora) == {expert_key(e, m) for e in range(2) for m in ("q", "v")}


def expert_update(client, cluster, size, seed):
    gen = torch.Generator().manual_seed(seed)
    lora = {
        expert_key(cluster, m): LoRAFactors(torch.randn(R, K, generator=gen), torch.randn(D, R, generator=gen), 2.0) for m in ("q", "v")
    }
    extra = {f"router.{m}.{p}": torch.randn(*shape, generator=gen) for m in ("q", "v") for p, shape in (("weight", (3, K)), ("bias", (3,)))}
    extra["head.weight"] = torch.randn(3, D, generator=gen)
    return Update(client, size, AdapterState(lora, extra))


def test_cluster_wise_fedavg_reaches_only_the_own_cluster_in_any_order():
    server, sizes, _ = allocated_server()
    before = [state.clone() for state in server.experts]
    updates = [expert_update(0, 0, sizes[0], 10), expert_update(2, 0, sizes[2], 11)]
    results = []
    for order in itertools.permutations(updates):
        trial, _, _ = allocated_server()
        trial.aggregate(2, list(order))
        results.append(trial.experts)
    total = sizes[0] + sizes[2]
    for m in ("q", "v"):
        expected_B = sum(u.num_examples / total * u.state.lora[expert_key(0, m)].B for u in updates)
        assert torch.allclose(results[0][0].lora[m].B, expected_B, atol=1e-6)
        assert torch.allclose(results[1][0].lora[m].B, results[0][0].lora[m].B, atol=1e-6)
    expected_router = sum(u.num_examples / total * u.state.extra["router.q.weight"] for u in updates)
    assert torch.allclose(results[0][0].extra["router.q.weight"], expected_router, atol=1e-6)
    for key, tensor in before[1].to_tensors().items():
        assert torch.equal(results[0][1].to_tensors()[key], tensor), "an update of cluster 0 changed cluster 1"
    with pytest.raises(UpdateError, match="exactly expert"):
        server.aggregate(2, [expert_update(1, 0, sizes[1], 12)])  # client 1 belongs to cluster 1


def test_identical_inputs_give_that_input_back_in_every_expert():
    """Identical inputs from clients of unequal sizes (10, 15, 20, 25).

    Warm-up and allocation: every client uploads the same adapter. Identical B are at distance 0,
    so the partition is arbitrary (every candidate count has silhouette 0), but whatever it is,
    each expert's LoRA (A, B, scale) and task head are that adapter (a size-weighted mean of
    copies). The routers are not averaged from anything: they are re-initialised, so the exact
    statement for them is equality with router_init(seed, layer, in_features, M).

    Mixture phase: when the sampled members of a cluster all upload the same expert, routers and
    head (a different state per cluster), each cluster's state becomes exactly its input."""
    server, sizes = make_server(4)
    same = grouped_states([0], seed=5)[0]
    server.aggregate(1, [Update(i, sizes[i], same.clone()) for i in range(4)])
    assert server.clusters is not None
    count = server.num_experts
    assert count >= 2 and any(server.clusters.count(m) >= 2 for m in range(count)), "a cluster must average several clients"
    routers = {f"{ROUTER}.{m}.{key}": t for m in ("q", "v") for key, t in router_init(server.context.seed, m, K, count).items()}
    for expert in server.experts:
        assert set(expert.lora) == set(same.lora)
        for m, factors in same.lora.items():
            assert torch.allclose(expert.lora[m].A, factors.A, rtol=1e-6, atol=1e-6)
            assert torch.allclose(expert.lora[m].B, factors.B, rtol=1e-6, atol=1e-6)
            assert expert.lora[m].scale == factors.scale
        assert set(expert.extra) == set(same.extra) | set(routers)
        assert torch.allclose(expert.extra["head.weight"], same.extra["head.weight"], rtol=1e-6, atol=1e-6)
        for key, tensor in routers.items():
            assert torch.equal(expert.extra[key], tensor), key

    gen = torch.Generator().manual_seed(17)
    uploads = {}
    for cluster, expert in enumerate(server.experts):
        moved = expert.map_tensors(lambda t: t + torch.randn(t.shape, generator=gen))
        uploads[cluster] = AdapterState({expert_key(cluster, m): f for m, f in moved.lora.items()}, moved.extra)
    server.aggregate(2, [Update(c, sizes[c], uploads[server.clusters[c]].clone()) for c in (3, 1, 0, 2)])
    for cluster, upload in uploads.items():
        expert = server.experts[cluster]
        for m in same.lora:
            sent = upload.lora[expert_key(cluster, m)]
            assert torch.allclose(expert.lora[m].A, sent.A, rtol=1e-6, atol=1e-6)
            assert torch.allclose(expert.lora[m].B, sent.B, rtol=1e-6, atol=1e-6)
        assert set(expert.extra) == set(upload.extra)
        for key, tensor in upload.extra.items():
            assert torch.allclose(expert.extra[key], tensor, rtol=1e-6, atol=1e-6), key


def test_server_state_round_trips_through_a_checkpoint():
    server, _, _ = allocated_server()
    fresh, _ = make_server(4)
    fresh.load_state_dict(server.state_dict())
    assert fresh.clusters == server.clusters
    for a, b in zip(fresh.experts, server.experts, strict=True):
        assert a.to_tensors().keys() == b.to_tensors().keys()
        assert all(torch.equal(a.to_tensors()[k], b.to_tensors()[k]) for k in a.to_tensors())
    warm, sizes = make_server(4, warmup_rounds=2)
    warm.aggregate(1, [Update(i, sizes[i], s) for i, s in enumerate(grouped_states([0, 1, 0, 1]))])
    restored, _ = make_server(4, warmup_rounds=2)
    restored.load_state_dict(warm.state_dict())
    assert restored.clusters is None and sorted(restored.warmup) == [0, 1, 2, 3]


def test_router_gives_a_distribution_over_selected_experts_always_including_its_own():
    assert slot_experts(1, 3).tolist() == [1, 1, 1, 0, 2]
    gen = torch.Generator().manual_seed(0)
    for experts in (1, 2, 3, 5):
        for own in range(experts):
            logits = 3 * torch.randn(64, 7, 2 * experts - 1, generator=gen)
            gates = adaptive_top_m(logits, own, experts)
            assert gates.shape == (64, 7, experts)
            assert torch.all(gates >= 0)
            assert torch.allclose(gates.sum(-1), torch.ones(64, 7), atol=1e-6)
            assert torch.all(gates[..., own] > 0), "the assigned expert is always selected"
    # by hand: M = 3, own = 1, slots [1, 1, 1, 0, 2]; logits favour slot 3 (expert 0), then slot 0
    logits = torch.tensor([0.5, 0.0, -1.0, 2.0, -3.0])
    p = torch.softmax(logits, 0)
    kept = p[[3, 0, 1]] / p[[3, 0, 1]].sum()
    assert torch.allclose(adaptive_top_m(logits, 1, 3), torch.stack([kept[0], kept[1] + kept[2], torch.tensor(0.0)]), atol=1e-6)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    config = config_with(
        tiny_overrides(tmp_path_factory.mktemp("runs"), **{"algorithm.name": "fedlease", "train.local_steps": 2, "data.max_examples": 400})
    )
    exp = build(config)
    updates = [exp.clients[c].run(1, exp.server.configure(1, c)) for c in exp.server.sample(1, exp.real_client_ids)]
    assert len(updates) == 4, "every client trains in the warm-up"
    exp.server.aggregate(1, updates)
    yield exp
    exp.close()


def test_live_mixture_trains_only_the_own_expert_and_does_not_leak(experiment):
    server = experiment.server
    assert server.clusters is not None and server.num_experts >= 2
    host = BranchHost.of(experiment.workbench)
    client_id = 0
    own = server.clusters[client_id]
    download = server.configure(2, client_id)
    client = FedLEASEClient(dataclasses.replace(experiment.clients[client_id].context, store=ClientStore()), server.params)
    update = client.run(2, download)
    assert set(update.state.lora) == {expert_key(own, m) for m in server.experts[own].lora}
    assert not torch.equal(
        update.state.lora[expert_key(own, "bert.encoder.layer.0.attention.self.query")].B,
        download.lora[expert_key(own, "bert.encoder.layer.0.attention.self.query")].B,
    )
    for expert in range(server.num_experts):
        if expert != own:
            for layer, factors in host.read_lora(expert_name(expert)).items():
                assert torch.equal(factors.B, download.lora[expert_key(expert, layer)].B), "a frozen expert moved"
    metrics = client.evaluate(download)
    assert math.isfinite(metrics["loss"])
    # another client (another cluster) in between changes nothing for this one
    other = next(c for c in range(4) if server.clusters[c] != own)
    other_client = FedLEASEClient(dataclasses.replace(experiment.clients[other].context, store=ClientStore()), server.params)
    other_client.run(2, server.configure(2, other))
    other_client.evaluate(server.configure(2, other))
    again = client.run(2, download)
    for key, tensor in update.state.to_tensors().items():
        assert torch.equal(again.state.to_tensors()[key], tensor)
    assert client.evaluate(download) == metrics


def task_metrics(path):
    rows = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        row.pop("seconds", None)
        row.pop("wall_seconds", None)
        rows.append(row)
    return rows


class StopAfter(Progress):
    def __init__(self, n):
        self.n = n

    def round_end(self, round, record):
        if round == self.n:
            raise KeyboardInterrupt


def test_end_to_end_with_resume_after_the_clustering(tmp_path):
    overrides = tiny_overrides(
        tmp_path,
        **{
            "algorithm.name": "fedlease",
            "federation.rounds": 3,
            "federation.sample_rate": 0.5,
            "train.local_steps": 2,
            "data.max_examples": 300,
        },
    )
    full, summary = start_run(config_with(overrides + ["run.dir=" + str(tmp_path / "full")]), Progress())
    assert summary["final_global"] and all(math.isfinite(v) for v in summary["final_global"].values())
    assert math.isfinite(summary["final_local"]["accuracy"]) and math.isfinite(summary["final_local"]["loss"])
    with pytest.raises(KeyboardInterrupt):
        start_run(config_with(overrides + ["run.dir=" + str(tmp_path / "cut")]), StopAfter(2))
    _, resumed = resume_run(tmp_path / "cut", Progress())
    assert task_metrics(tmp_path / "cut") == task_metrics(full.path)
    assert resumed["final_local"] == summary["final_local"]
