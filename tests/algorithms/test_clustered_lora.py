"""clustered-lora: clients grouped by the similarity of their adapters' dense updates (any ranks),
one adapter per cluster, aggregated inside each cluster by FlexLoRA or HetLoRA; random adapter
states with closed forms computed here, and one resumed end-to-end run."""

import math

import numpy as np
import pytest
import torch
from hetrank_helpers import (  # noqa: F401 (no_plots is an autouse fixture)
    ALPHA,
    MODULES,
    D,
    K,
    assert_resume_reproduces_the_uninterrupted_run,
    initial_state,
    make_client,
    make_server,
    no_plots,
    random_state,
    scale_of,
)

from atoll.algorithms.clustered_lora import CLUSTER_KEY, delta_distances, delta_inner_products
from atoll.errors import ConfigError, UpdateError
from atoll.fl.state import AdapterState, LoRAFactors, Update

RANKS = [2, 3, 4, 6, 3, 2]
GROUPS = [0, 1, 0, 1, 1, 0]
SIZES = [10, 25, 5, 60, 15, 30]


def planted_states(groups, ranks, seed=0, noise=0.05):
    """Adapters whose dense updates are a group's rank-2 update plus a small one of their own:
    s_k B_k A_k = B_g A_g + noise * s_k N_k R_k, at each client's own rank (>= 2) and scale."""
    gen = torch.Generator().manual_seed(seed)
    shared = {g: {m: (torch.randn(D, 2, generator=gen), torch.randn(2, K, generator=gen)) for m in MODULES} for g in set(groups)}
    states = []
    for group, rank in zip(groups, ranks, strict=True):
        lora = {}
        for m in MODULES:
            B_g, A_g = shared[group][m]
            own_B = noise * torch.randn(D, rank - 2, generator=gen)
            own_A = torch.randn(rank - 2, K, generator=gen)
            lora[m] = LoRAFactors(torch.cat([A_g, own_A]), torch.cat([B_g, own_B], 1) / scale_of(rank), scale_of(rank))
        states.append(AdapterState(lora, random_state(50 + len(states)).extra))
    return states


def dense(state, m):
    f = state.lora[m]
    return f.scale * f.B.double() @ f.A.double()


def best_rank(delta, rank):
    U, S, Vh = torch.linalg.svd(delta)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def allocated(aggregation, groups=GROUPS, ranks=RANKS, sizes=SIZES):
    server = make_server("clustered-lora", sizes, ranks, aggregation=aggregation)
    states = planted_states(groups, ranks)
    server.aggregate(1, [Update(c, sizes[c], s) for c, s in enumerate(states)])
    return server, states


# -- similarity ------------------------------------------------------------------------------------------


def test_inner_products_of_updates_of_different_ranks_equal_the_dense_ones():
    states = [random_state(i, rank=r) for i, r in enumerate([2, 5, 3])]
    gram = delta_inner_products([s.lora["q"] for s in states])
    expected = torch.tensor([[float((dense(a, "q") * dense(b, "q")).sum()) for b in states] for a in states], dtype=torch.float64)
    assert torch.allclose(gram, expected, rtol=1e-10)
    distances = delta_distances(states)
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        cosines = [
            float(torch.nn.functional.cosine_similarity(dense(states[i], m).flatten(), dense(states[j], m).flatten(), 0)) for m in MODULES
        ]
        assert distances[i, j] == pytest.approx(1 - np.mean(cosines), abs=1e-10)


def test_distance_depends_on_the_update_only_not_on_its_factors_or_rank():
    """The same update refactored (B Q, Q^-1 A) or zero-padded to a higher rank at another scale is
    at distance 0; FedLEASE's B-cosine could not even compare the padded one (other shape)."""
    original = random_state(7, rank=3)
    gen = torch.Generator().manual_seed(1)
    Q = torch.randn(3, 3, generator=gen) + 3 * torch.eye(3)
    rotated = AdapterState({m: LoRAFactors(torch.linalg.solve(Q, f.A), f.B @ Q, f.scale) for m, f in original.lora.items()})
    padded = AdapterState(
        {
            m: LoRAFactors(
                torch.cat([f.A, torch.randn(5, K, generator=gen)]),
                torch.cat([f.B * f.scale / scale_of(8), torch.zeros(D, 5)], 1),
                scale_of(8),
            )
            for m, f in original.lora.items()
        }
    )
    other = random_state(8, rank=3)
    distances = delta_distances([original, rotated, padded, other])
    assert np.allclose(distances[:3, :3], 0.0, atol=1e-9)
    assert distances[0, 3] > 0.5


def test_planted_groups_of_mixed_ranks_are_found_in_any_upload_order():
    states = planted_states(GROUPS, RANKS)
    found = []
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 0, 4, 1, 2]):
        server = make_server("clustered-lora", SIZES, RANKS)
        server.aggregate(1, [Update(c, SIZES[c], states[c]) for c in order])
        found.append(server.clusters)
    assert found[0] == found[1] == GROUPS  # labels numbered by each cluster's smallest client id
    assert make_server("clustered-lora", SIZES, RANKS).num_clusters == 0


# -- one adapter per cluster, at each client's rank --------------------------------------------------------


def test_flexlora_inside_each_cluster_gives_each_member_the_best_rank_r_approximation_of_its_clusters_update():
    server, states = allocated("flexlora")
    for client, rank in enumerate(RANKS):
        members = [c for c in range(len(GROUPS)) if GROUPS[c] == GROUPS[client]]
        total = sum(SIZES[c] for c in members)
        download = server.configure(2, client)
        assert int(download.control[CLUSTER_KEY]) == GROUPS[client] and download.rank() == rank
        for m in MODULES:
            cluster_delta = sum(SIZES[c] / total * dense(states[c], m) for c in members)
            assert download.lora[m].scale == ALPHA / rank
            assert torch.allclose(download.lora[m].delta().double(), best_rank(cluster_delta, rank), atol=1e-4)
        expected_head = sum(SIZES[c] / total * states[c].extra["head.weight"] for c in members)
        assert torch.allclose(download.extra["head.weight"], expected_head, atol=1e-5)


def test_hetlora_inside_each_cluster_pads_weights_by_norm_and_truncates_to_each_rank():
    server, states = allocated("hetlora")
    r_max, s_g = max(RANKS), scale_of(max(RANKS))
    for cluster in (0, 1):
        members = [c for c in range(len(GROUPS)) if GROUPS[c] == cluster]
        for m in MODULES:
            norms = [float(torch.linalg.norm(dense(states[c], m))) for c in members]
            weights = [n / sum(norms) for n in norms]
            A_g = sum(w * torch.cat([states[c].lora[m].A, torch.zeros(r_max - RANKS[c], K)]) for w, c in zip(weights, members, strict=True))
            B_g = sum(
                w * torch.cat([states[c].lora[m].B * states[c].lora[m].scale / s_g, torch.zeros(D, r_max - RANKS[c])], 1)
                for w, c in zip(weights, members, strict=True)
            )
            for client in members:
                r = RANKS[client]
                got = server.configure(2, client).lora[m]
                assert torch.allclose(got.A, A_g[:r], atol=1e-6)
                assert torch.allclose(scale_of(r) * got.B @ got.A, s_g * B_g[:, :r] @ A_g[:r], atol=1e-5)  # nothing re-scaled


def test_an_update_reaches_only_its_own_cluster_and_a_cluster_without_updates_keeps_its_adapter():
    for aggregation in ("flexlora", "hetlora"):
        server, _ = allocated(aggregation)
        before = {c: server.configure(2, c) for c in range(len(GROUPS))}
        trained = [Update(c, SIZES[c], random_state(100 + c, rank=RANKS[c])) for c in (0, 2)]  # cluster 0 only
        server.aggregate(2, trained)
        for client, group in enumerate(GROUPS):
            after = server.configure(3, client)
            same = all(torch.equal(after.lora[m].delta(), before[client].lora[m].delta()) for m in MODULES)
            assert same == (group == 1), (aggregation, client)


# -- warm-up ---------------------------------------------------------------------------------------------


def test_warm_up_starts_every_rank_from_one_common_adapter_then_from_the_clients_own():
    server = make_server("clustered-lora", SIZES, RANKS, warmup_rounds=2)
    start = initial_state(max(RANKS))
    for client, rank in enumerate(RANKS):
        download = server.configure(1, client)
        assert CLUSTER_KEY not in download.control
        for m in MODULES:
            assert torch.equal(download.lora[m].A, start.lora[m].A[:rank]) and torch.count_nonzero(download.lora[m].B) == 0
    assert server.sample(1, [5, 0, 3]) == [0, 3, 5]  # every available client trains in the warm-up
    states = planted_states(GROUPS, RANKS)
    server.aggregate(1, [Update(c, SIZES[c], states[c]) for c in range(3)])
    assert server.clusters is None and server.configure(2, 0).lora == {}  # client 0 continues from its own adapter
    client = make_client("clustered-lora", client_id=0, rank=2)
    client.compose(1, make_server("clustered-lora", SIZES, RANKS).configure(1, 0))
    client.keep(1, states[1], states[0])  # a warm-up round: the client keeps what it trained
    resumed = client.compose(2, AdapterState())
    assert all(torch.equal(resumed.lora[m].B, states[0].lora[m].B) for m in MODULES)
    clustered, _ = allocated("flexlora")
    client.compose(3, clustered.configure(3, 0))
    client.keep(3, states[0], states[0])  # a clustered round: nothing of its own is kept
    assert client.context.store.get(0) is None


def test_a_client_absent_from_the_warm_up_joins_the_largest_cluster():
    groups, ranks, sizes = [0, 0, 0, 1, 1, 0], [2, 3, 4, 6, 3, 2], [10] * 7
    server = make_server("clustered-lora", sizes, ranks + [4])
    states = planted_states(groups, ranks)
    server.aggregate(1, [Update(c, 10, s) for c, s in enumerate(states)])
    assert server.clusters == [0, 0, 0, 1, 1, 0, 0]
    assert server.configure(2, 6).rank() == 4


def test_untrained_adapters_too_few_rounds_and_incomplete_uploads_are_refused():
    with pytest.raises(ConfigError, match="warm-up"):
        make_server("clustered-lora", SIZES, RANKS, warmup_rounds=5)  # federation.rounds defaults to 5
    server = make_server("clustered-lora", SIZES, RANKS)
    untrained = [
        AdapterState({m: LoRAFactors(f.A, f.B, f.scale) for m, f in initial_state(r).lora.items()}, initial_state(r).extra) for r in RANKS
    ]
    with pytest.raises(UpdateError, match="B = 0"):
        server.aggregate(1, [Update(c, SIZES[c], s) for c, s in enumerate(untrained)])
    with pytest.raises(UpdateError, match="both factors"):
        server.aggregate(1, [Update(0, 10, random_state(0, rank=2).without("A"))])


def test_checkpoint_round_trip_keeps_clusters_and_every_download():
    for aggregation in ("flexlora", "hetlora"):
        server, _ = allocated(aggregation)
        copy = make_server("clustered-lora", SIZES, RANKS, aggregation=aggregation)
        copy.load_state_dict(server.state_dict())
        assert copy.clusters == server.clusters
        for client in range(len(RANKS)):
            a, b = server.configure(3, client), copy.configure(3, client)
            assert all(torch.equal(a.lora[m].A, b.lora[m].A) and torch.equal(a.lora[m].B, b.lora[m].B) for m in MODULES)


def test_resume_inside_the_warm_up_reproduces_the_uninterrupted_run(tmp_path):
    """Cut after round 1 of a 2-round warm-up: the clients' own adapters (client store) and the
    server's warm-up uploads must both cross the cut for clustering after round 2 to match."""
    records = assert_resume_reproduces_the_uninterrupted_run(
        tmp_path,
        {
            "algorithm.name": "clustered-lora",
            "algorithm.aggregation": "hetlora",
            "algorithm.warmup_rounds": 2,
            "model.lora.rank_cycle": "[4, 8]",
            "federation.rounds": 3,
            "eval.local": "final",
        },
        stop_after=1,
    )
    assert all(math.isfinite(v) for v in records[-1]["local"].values() if isinstance(v, float))


# -- planted tasks, trained clients ------------------------------------------------------------------------

TASKS = [0, 1, 1, 0, 0, 1, 1, 0]
TASK_RANKS = [4, 8] * 4  # alternating, so a grouping by rank (or by shape) is not the grouping by task


def train_locally(download: AdapterState, target: dict[str, torch.Tensor], seed: int, steps: int = 150) -> AdapterState:
    """A client's warm-up: both LoRA factors of every module fitted by Adam to its own examples of
    its task, y = W_t x + noise, through its adapter's output s B A x (the head is left as downloaded)."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for m, start in download.lora.items():
        X = torch.randn(64, K, generator=gen)
        Y = X @ target[m].T + 0.05 * torch.randn(64, D, generator=gen)
        A, B = start.A.clone().requires_grad_(), start.B.clone().requires_grad_()
        optimizer = torch.optim.Adam([A, B], lr=0.05)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = ((X @ (start.scale * B @ A).T - Y) ** 2).mean()
            loss.backward()
            optimizer.step()
        lora[m] = LoRAFactors(A.detach(), B.detach(), start.scale)
    return AdapterState(lora, {n: t.clone() for n, t in download.extra.items()})


def test_clients_of_two_planted_tasks_with_alternating_ranks_4_and_8_are_clustered_by_task():
    """Two synthetic regression tasks (each a rank-3 change of the module's output); clients of
    either task alternate between ranks 4 and 8, start from the server's common warm-up adapter and
    train on their own examples. Clustering must find the tasks: one adapter per task, each client
    served at its own rank. It works only because the distance compares the dense updates s B A:
    the factors differ in shape across ranks, and within a task the trained factors differ
    (different data, different starts) while the updates agree."""
    gen = torch.Generator().manual_seed(11)
    targets = [{m: torch.randn(D, 3, generator=gen) @ torch.randn(3, K, generator=gen) / 3 for m in MODULES} for _ in range(2)]
    sizes = [64] * len(TASKS)
    server = make_server("clustered-lora", sizes, TASK_RANKS, max_clusters=4)
    uploads = []
    for client, (task, rank) in enumerate(zip(TASKS, TASK_RANKS, strict=True)):
        download = server.configure(1, client)
        assert download.rank() == rank
        uploads.append(Update(client, sizes[client], train_locally(download, targets[task], seed=client)))
    distances = delta_distances([u.state for u in uploads])
    same = np.array([[a == b for b in TASKS] for a in TASKS]) & ~np.eye(len(TASKS), dtype=bool)
    assert distances[same].max() < distances[~same & ~np.eye(len(TASKS), dtype=bool)].min()
    server.aggregate(1, uploads)
    assert server.clusters == TASKS and server.num_clusters == 2  # not [0, 1, 0, 1, ...]: ranks do not cluster
    for client, (task, rank) in enumerate(zip(TASKS, TASK_RANKS, strict=True)):
        download = server.configure(2, client)
        assert download.rank() == rank and int(download.control[CLUSTER_KEY]) == task
        for m in MODULES:  # each cluster's adapter is close to its own task's change, far from the other's
            delta = download.lora[m].delta()
            own, other = (float(torch.linalg.norm(delta - targets[t][m]) / torch.linalg.norm(targets[t][m])) for t in (task, 1 - task))
            assert own < 0.3 < other, (client, m, own, other)
