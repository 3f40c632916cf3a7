"""FedLEASE: clustered LoRA experts with an adaptive top-M router (Wang, Bian, Zhang, Xu,
"Adaptive LoRA Experts Allocation and Selection for Federated Fine-Tuning", NeurIPS 2025).

1. Warm-up (``warmup_rounds``, every client): each client trains its own LoRA from the common
   initial adapter and uploads it.
2. Allocation: with the *trained* B matrices, d(i, j) = mean over layers of 1 - cos(vec B_i, vec B_j);
   average-linkage agglomerative clustering; the number of clusters M in [2, min(max_clusters, N-1)]
   maximises the silhouette score. Expert m starts as the size-weighted mean of its members'
   LoRAs (A and B); each cluster also gets a router per layer and a task head.
3. Mixture: every client downloads all M experts plus its cluster's routers and head; per token,
   y = W0 x + sum_e g_e(x) s B_e A_e x with g from the adaptive top-M router (2M - 1 outputs, M of
   them standing for the client's own expert; top-M kept, renormalised: see atoll.models.moe).
   A client trains its own expert, its cluster's routers and head (other experts frozen).
4. Server: cluster-wise FedAvg: expert, routers and head of cluster m <- sum over m's updating
   members of p_k x_k, p_k = n_k / sum of their n. An update only reaches its own cluster.

Flags: ``personal`` (a client's model is its cluster's routers and head over shared experts);
no global model (evaluation on the global test set averages the clients' own models); not
``asynchronous`` (clustering needs every client's warm-up adapter at one point in time); mixed
ranks refused (experts are shared across clusters' clients).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from atoll.algorithms.catalog import SPECS
from atoll.errors import ConfigError, UpdateError
from atoll.fl.base import BaseClient, BaseServer, average_states, weighted_average
from atoll.fl.state import AdapterState, LoRAFactors, Update, example_weights
from atoll.models.branches import BranchHost, train_parameters
from atoll.models.moe import ROUTER, AdaptiveTopM, MixtureOfExperts, expert_name, router_init

CLUSTER_KEY = "fedlease.cluster"


# -- allocation: distances, clustering, silhouette ------------------------------------------------


def b_distances(matrices: list[dict[str, Tensor]]) -> np.ndarray:
    """d(i, j) = mean over layers of (1 - cos(vec B_i, vec B_j)); a zero B has cosine 0 to everything."""
    layers = sorted(matrices[0])
    total = torch.zeros(len(matrices), len(matrices), dtype=torch.float64)
    for layer in layers:
        vectors = F.normalize(torch.stack([m[layer].double().reshape(-1) for m in matrices]), dim=1)
        total += 1.0 - vectors @ vectors.T
    distances = (total / len(layers)).numpy()
    distances = np.clip((distances + distances.T) / 2, 0.0, None)
    np.fill_diagonal(distances, 0.0)
    return distances


def canonical(groups: list[list[int]], size: int) -> np.ndarray:
    """Labels numbered by each group's smallest member (so labels depend only on the partition)."""
    labels = np.empty(size, dtype=np.int64)
    for label, members in enumerate(sorted(groups, key=min)):
        labels[members] = label
    return labels


def average_linkage(distances: np.ndarray) -> dict[int, np.ndarray]:
    """Agglomerative clustering with average linkage: labels for every number of clusters 1..N.
    The closest pair merges first; ties go to the lowest (row, column) index."""
    size = len(distances)
    work = distances.astype(np.float64).copy()
    np.fill_diagonal(work, np.inf)
    groups: dict[int, list[int]] = {i: [i] for i in range(size)}
    levels = {size: canonical(list(groups.values()), size)}
    while len(groups) > 1:
        a, b = divmod(int(np.argmin(work)), size)
        a, b = min(a, b), max(a, b)
        na, nb = len(groups[a]), len(groups[b])
        merged = (na * work[a] + nb * work[b]) / (na + nb)  # Lance-Williams update for average linkage
        work[a, :] = merged
        work[:, a] = merged
        work[a, a] = np.inf
        work[b, :] = np.inf
        work[:, b] = np.inf
        groups[a] = groups[a] + groups.pop(b)
        levels[len(groups)] = canonical(list(groups.values()), size)
    return levels


def silhouette(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (b - a) / max(a, b) with precomputed distances; 0 for singleton members."""
    scores = []
    clusters = np.unique(labels)
    for i in range(len(labels)):
        same = labels == labels[i]
        if same.sum() <= 1:
            scores.append(0.0)
            continue
        a = distances[i, same].sum() / (same.sum() - 1)
        b = min(distances[i, labels == c].mean() for c in clusters if c != labels[i])
        denominator = max(a, b)
        scores.append(0.0 if denominator == 0 else (b - a) / denominator)
    return float(np.mean(scores))


def choose_clusters(distances: np.ndarray, max_clusters: int) -> np.ndarray:
    """Labels with the number of clusters in [2, min(max_clusters, N - 1)] of best silhouette (ties:
    fewer clusters); one cluster when that range is empty."""
    size = len(distances)
    upper = min(max_clusters, size - 1)
    if upper < 2:
        return np.zeros(size, dtype=np.int64)
    levels = average_linkage(distances)
    best_labels, best_score = None, -np.inf
    for count in range(2, upper + 1):
        score = silhouette(distances, levels[count])
        if score > best_score + 1e-12:
            best_labels, best_score = levels[count], score
    return best_labels


# -- client ------------------------------------------------------------------------------------------


def expert_key(expert: int, layer: str) -> str:
    return f"{expert_name(expert)}:{layer}"


def parse_expert_key(key: str) -> tuple[int, str]:
    head, _, layer = key.partition(":")
    if not head.startswith("expert") or not layer or not head[len("expert") :].isdigit():
        raise UpdateError(f"'{key}' is not an expert module name 'expert<m>:<module>'")
    return int(head[len("expert") :]), layer


class FedLEASEClient(BaseClient):
    @property
    def host(self) -> BranchHost:
        return BranchHost.of(self.workbench)

    # -- warm-up: an own LoRA, trained alone and kept in the store --------------------------------
    def compose(self, round: int, download: AdapterState) -> AdapterState:
        stored = self.context.store.get(self.client_id)
        if stored is not None:
            return AdapterState.from_tensors(stored)
        return download if download.lora else self.workbench.initial_state(self.context.rank)

    def keep(self, round: int, start: AdapterState, trained: AdapterState) -> None:
        self.context.store.put(self.client_id, trained.to_tensors())

    # -- mixture phase ------------------------------------------------------------------------------
    def load_mixture(self, download: AdapterState) -> tuple[MixtureOfExperts, int]:
        """Experts into the expert branches, the cluster's routers into the routers, its head into
        PEFT's adapter (whose own LoRA is reset to B = 0 and gated off). Every live tensor is
        written, so nothing of the previous client survives."""
        self.context.store.discard(self.client_id)  # the warm-up adapter is not needed any more
        own = int(download.control[CLUSTER_KEY])
        experts: dict[int, dict[str, LoRAFactors]] = {}
        for key, factors in download.lora.items():
            expert, layer = parse_expert_key(key)
            experts.setdefault(expert, {})[layer] = factors
        workbench = self.workbench
        config = self.context.config
        mixture = MixtureOfExperts.of(workbench)
        mixture.ensure(len(experts), self.context.rank, config.model.lora, config.seed)
        for expert, factors in experts.items():
            self.host.write_lora(expert_name(expert), factors)
        mixture.write_routers({k: v for k, v in download.extra.items() if k.startswith(ROUTER + ".")})
        head = {k: v for k, v in download.extra.items() if not k.startswith(ROUTER + ".")}
        workbench.load(AdapterState(lora=workbench.initial_state(self.context.rank).lora, extra=head, base=download.base))
        return mixture, own

    def run(self, round: int, download: AdapterState) -> Update:
        if CLUSTER_KEY not in download.control:
            return super().run(round, download)
        mixture, own = self.load_mixture(download)
        workbench = self.workbench
        params = (
            self.host.parameters(expert_name(own))
            + mixture.router_parameters()
            + workbench.active.parameters(lora_A=False, lora_B=False, extra=True)
        )
        with self.host.engaged(AdaptiveTopM(mixture, own)):
            metrics = train_parameters(
                workbench, params, self.context.train_indices, self.plan(round), self.context.config, (self.client_id, round)
            )
        lora = {expert_key(own, layer): factors for layer, factors in self.host.read_lora(expert_name(own)).items()}
        extra = mixture.read_routers()
        extra.update(workbench.read().extra)
        return Update(self.client_id, self.context.num_examples, AdapterState(lora, extra), metrics)

    def evaluate(self, download: AdapterState, indices: np.ndarray | None = None) -> dict[str, float]:
        chosen = self.context.test_indices if indices is None else indices
        max_generate = self.context.config.eval.max_generate
        if CLUSTER_KEY not in download.control:
            self.workbench.load(self.compose(0, download))
            return self.workbench.evaluate(chosen, max_generate=max_generate)
        mixture, own = self.load_mixture(download)
        with self.host.engaged(AdaptiveTopM(mixture, own)):
            return self.workbench.evaluate(chosen, max_generate=max_generate)


# -- server ------------------------------------------------------------------------------------------


class FedLEASE(BaseServer):
    spec = SPECS["fedlease"]
    client_class = FedLEASEClient

    def __init__(self, context, params):
        super().__init__(context, params)
        rounds = context.config.federation.rounds
        if rounds <= params.warmup_rounds:
            raise ConfigError(
                f"fedlease with federation.rounds={rounds} never leaves its {params.warmup_rounds} warm-up round(s)",
                "set algorithm.warmup_rounds below federation.rounds",
            )
        self.clusters: list[int] | None = None
        self.experts: list[AdapterState] = []  # per cluster: expert factors (module names), routers, head
        self.warmup: dict[int, AdapterState] = {}

    @classmethod
    def prepare_workbench(cls, workbench, config, params) -> None:
        MixtureOfExperts.of(workbench)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    # -- protocol ----------------------------------------------------------------------------------
    def sample(self, round: int, available: list[int]) -> list[int]:
        if self.clusters is None:
            return sorted(available)  # warm-up: every client trains its probe adapter
        return super().sample(round, available)

    def configure(self, round: int, client_id: int) -> AdapterState:
        if self.clusters is None:
            return AdapterState() if client_id in self.warmup else self.global_state
        own = self.clusters[client_id]
        lora = {expert_key(m, layer): factors for m, state in enumerate(self.experts) for layer, factors in state.lora.items()}
        control = {CLUSTER_KEY: torch.tensor(own, dtype=torch.int64)}  # which expert is the client's own
        return AdapterState(lora, dict(self.experts[own].extra), dict(self.global_state.base), control)

    def aggregate(self, round: int, updates: list[Update]) -> None:
        if self.clusters is None:
            for update in updates:
                missing = set(self.global_state.lora) - set(update.state.lora)
                if missing:
                    raise UpdateError(f"client {update.client_id} sent a warm-up adapter without '{sorted(missing)[0]}'")
                self.warmup[update.client_id] = update.state
            if round >= self.params.warmup_rounds:
                self.allocate()
            return
        groups: dict[int, list[Update]] = {}
        for update in updates:
            own = self.clusters[update.client_id]
            expected = {expert_key(own, layer) for layer in self.experts[own].lora}
            if set(update.state.lora) != expected:
                raise UpdateError(f"client {update.client_id} of cluster {own} must upload exactly expert {own}")
            groups.setdefault(own, []).append(update)
        for own, members in sorted(groups.items()):
            states = [AdapterState({parse_expert_key(k)[1]: f for k, f in u.state.lora.items()}, dict(u.state.extra)) for u in members]
            self.experts[own] = average_states(states, example_weights(members), base=self.experts[own])

    def allocate(self) -> None:
        """Cluster the clients on their trained B matrices and build one expert per cluster."""
        ids = sorted(self.warmup)
        layers = sorted(self.global_state.lora)
        matrices = [{layer: self.warmup[c].lora[layer].B for layer in layers} for c in ids]
        if all(torch.count_nonzero(m[layer]) == 0 for m in matrices for layer in layers):
            raise UpdateError(
                "every warm-up adapter has B = 0: clustering needs trained B matrices", "give the warm-up rounds training steps"
            )
        labels = choose_clusters(b_distances(matrices), self.params.max_clusters)
        count = int(labels.max()) + 1
        sizes = self.context.client_sizes
        self.experts = []
        for cluster in range(count):
            members = [c for c, label in zip(ids, labels) if label == cluster]
            total = sum(sizes[c] for c in members)
            weights = [sizes[c] / total if total else 1.0 / len(members) for c in members]
            states = [self.warmup[c] for c in members]
            lora = {}
            for layer in layers:
                lora[layer] = LoRAFactors(
                    weighted_average([s.lora[layer].A for s in states], weights),
                    weighted_average([s.lora[layer].B for s in states], weights),
                    states[0].lora[layer].scale,
                )
            extra = {key: weighted_average([s.extra[key] for s in states], weights) for key in self.global_state.extra}
            for layer in layers:
                in_features = int(self.global_state.lora[layer].A.shape[1])
                for key, tensor in router_init(self.context.seed, layer, in_features, count).items():
                    extra[f"{ROUTER}.{layer}.{key}"] = tensor
            self.experts.append(AdapterState(lora, extra))
        clusters = [-1] * self.context.num_clients
        for client, label in zip(ids, labels):
            clusters[client] = int(label)
        largest = int(np.argmax(np.bincount(labels)))
        self.clusters = [largest if c < 0 else c for c in clusters]  # clients never seen join the largest cluster
        self.warmup = {}

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        tensors = super().state_dict()
        if self.clusters is not None:
            tensors["fedlease.clusters"] = torch.tensor(self.clusters, dtype=torch.int64)
        for cluster, state in enumerate(self.experts):
            tensors.update({f"cluster{cluster}.{k}": v for k, v in state.to_tensors().items()})
        for client, state in self.warmup.items():
            tensors.update({f"warmup{client}.{k}": v for k, v in state.to_tensors().items()})
        return tensors

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        super().load_state_dict(tensors)
        self.clusters = tensors["fedlease.clusters"].tolist() if "fedlease.clusters" in tensors else None
        experts: dict[int, dict[str, Tensor]] = {}
        warmup: dict[int, dict[str, Tensor]] = {}
        for key, tensor in tensors.items():
            head, _, rest = key.partition(".")
            if head.startswith("cluster") and head[len("cluster") :].isdigit():
                experts.setdefault(int(head[len("cluster") :]), {})[rest] = tensor
            elif head.startswith("warmup") and head[len("warmup") :].isdigit():
                warmup.setdefault(int(head[len("warmup") :]), {})[rest] = tensor
        self.experts = [AdapterState.from_tensors(experts[c]) for c in sorted(experts)]
        self.warmup = {c: AdapterState.from_tensors(t) for c, t in warmup.items()}
