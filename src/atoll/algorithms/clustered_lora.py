"""Clustered heterogeneous-rank LoRA: clients grouped by what their adapters learned, one adapter per
cluster, each aggregated across different ranks with FlexLoRA or HetLoRA. A composition of three
published pieces (the combination itself is atoll's):

- task clustering as FedLEASE does it (Wang, Bian, Zhang, Xu, "Adaptive LoRA Experts Allocation and
  Selection for Federated Fine-Tuning", NeurIPS 2025): warm-up rounds of independent local LoRA
  training, then average-linkage agglomerative clustering of the trained adapters with the number
  of clusters in [2, min(max_clusters, N - 1)] chosen by silhouette score, and cluster-wise
  aggregation (an update only reaches its own cluster). FedLEASE keeps the M cluster adapters as
  routed experts; here each cluster's adapter is the model of its members, with no router;
- per-cluster FlexLoRA (Bai, Chen, Qian, Yao, Li, "Federated Fine-tuning of Large Language Models
  under Heterogeneous Tasks and Client Resources", NeurIPS 2024): dW_m = sum_k p_k s_k B_k A_k over
  the cluster's updates, and a client of rank r_k gets the best rank-r_k approximation of dW_m;
- or per-cluster HetLoRA (Cho, Liu, Xu, Fahrezi, Joshi, "Heterogeneous LoRA for Federated
  Fine-tuning of On-Device Foundation Models", EMNLP 2024): zero-padding to r_max with sparsity
  weights ||s_k B_k A_k||_F up, truncation to r_k down (no self-pruning: ranks are the devices').

Ranks are each client's own (``model.lora.client_ranks``, ``rank_cycle``, or in realistic mode the
device tier a sys.yaml assigns), so a phone trains rank 4 and a laptop rank 16 in one cluster.

Similarity. FedLEASE compares vec(B_i) and vec(B_j), which needs one shape; with mixed ranks the
shapes differ, so the distance here is between the adapters' dense updates,
d(i, j) = mean over modules of 1 - cos(s_i B_i A_i, s_j B_j A_j), computed from r x r Gram
matrices without forming a d x k matrix (<X, Y>_F = s_i s_j sum((B_i^T B_j) * (A_i A_j^T))). It is
the same for any factorisation of the same update and independent of the rank.

Warm-up. Every available client trains from the common start (the seeded rank-r_max adapter
truncated to its rank, B = 0); in later warm-up rounds it continues from its own adapter (kept in
the client store). After round ``warmup_rounds`` the server clusters the uploads, and each cluster
starts from its members' warm-up adapters aggregated by the cluster's rule. A client never seen in
the warm-up joins the largest cluster.

Flags: ``personal`` (a client's model is its cluster's adapter at its own rank, one LoRA:
``run.export_personal`` writes it); no global model (evaluation on the global test set averages
the clients' own models); not ``asynchronous`` (clustering needs every warm-up adapter at one
point in time, and FlexLoRA's dW is one round's sum); mixed ranks "native".
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from atoll.algorithms._lowrank import RankTemplates, lowrank_svd, stack
from atoll.algorithms.catalog import SPECS
from atoll.algorithms.fedlease import choose_clusters
from atoll.algorithms.flexlora import svd_factors
from atoll.algorithms.hetlora import sparsity_weights, to_client, to_global
from atoll.errors import ConfigError, UpdateError
from atoll.fl.base import BaseClient, BaseServer, weighted_average
from atoll.fl.state import AdapterState, LoRAFactors, Update, example_weights

CLUSTER_KEY = "clustered.cluster"


# -- similarity of adapters of any ranks ------------------------------------------------------------------


def delta_inner_products(factors: list[LoRAFactors]) -> Tensor:
    """G[i, j] = <s_i B_i A_i, s_j B_j A_j>_F for adapters of one module, any ranks (float64).
    With the stacks B = [B_1 ... B_N] and A = [s_1 A_1; ...; s_N A_N], G sums the (i, j) blocks of
    (B^T B) * (A A^T)."""
    B = torch.cat([f.B.double() for f in factors], dim=1)
    A = torch.cat([float(f.scale) * f.A.double() for f in factors], dim=0)
    owner = torch.cat([torch.full((f.rank,), i, dtype=torch.long) for i, f in enumerate(factors)])
    blocks = torch.zeros(len(factors), owner.numel(), dtype=torch.float64)
    blocks[owner, torch.arange(owner.numel())] = 1.0
    return blocks @ ((B.T @ B) * (A @ A.T)) @ blocks.T


def delta_distances(states: list[AdapterState]) -> np.ndarray:
    """d(i, j) = mean over modules of 1 - cos(s_i B_i A_i, s_j B_j A_j); a zero update has cosine 0
    to everything (distance 1)."""
    modules = sorted(states[0].lora)
    total = torch.zeros(len(states), len(states), dtype=torch.float64)
    for module in modules:
        gram = delta_inner_products([state.lora[module] for state in states])
        norms = gram.diagonal().clamp_min(0.0).sqrt()
        denominator = norms[:, None] * norms[None, :]
        cosine = torch.where(denominator > 0, gram / denominator.clamp_min(1e-300), torch.zeros_like(gram))
        total += 1.0 - cosine.clamp(-1.0, 1.0)
    distances = (total / len(modules)).numpy()
    distances = np.clip((distances + distances.T) / 2, 0.0, None)
    np.fill_diagonal(distances, 0.0)
    return distances


# -- one cluster's model under each rule -----------------------------------------------------------------


class FlexLoRACluster:
    """dW = sum_k p_k s_k B_k A_k of the cluster's latest updates (kept as stacked factors); a client
    of rank r gets B = U_r S_r / s_r, A = V_r^T (FlexLoRA's redistribution)."""

    def __init__(self, head: dict[str, Tensor]):
        self.stacks: dict[str, tuple[Tensor, Tensor]] = {}
        self.svd: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self.head = dict(head)

    def fit(self, updates: list[Update]) -> None:
        weights = example_weights(updates)
        names = sorted(updates[0].state.lora)
        self.stacks = {name: stack([u.state.lora[name] for u in updates], weights) for name in names}
        self.head = {name: weighted_average([u.state.extra[name] for u in updates], weights) for name in self.head}
        self.svd = {name: lowrank_svd(*parts) for name, parts in self.stacks.items()}

    def for_rank(self, template: AdapterState) -> AdapterState:
        rank = template.rank()
        lora = {name: svd_factors(*self.svd[name], rank, f.scale, f) for name, f in template.lora.items()}
        return AdapterState(lora, {n: t.clone() for n, t in self.head.items()})

    def delta(self, name: str) -> Tensor:
        B_stack, A_stack = self.stacks[name]
        return B_stack @ A_stack

    def state_dict(self) -> dict[str, Tensor]:
        tensors = {f"head.{n}": t for n, t in self.head.items()}
        for name, (B_stack, A_stack) in self.stacks.items():
            tensors[f"B.{name}"], tensors[f"A.{name}"] = B_stack, A_stack
        return tensors

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        self.head = {k[len("head.") :]: v for k, v in tensors.items() if k.startswith("head.")}
        B = {k[len("B.") :]: v for k, v in tensors.items() if k.startswith("B.")}
        A = {k[len("A.") :]: v for k, v in tensors.items() if k.startswith("A.")}
        self.stacks = {name: (B[name], A[name]) for name in sorted(B)}
        self.svd = {name: lowrank_svd(*parts) for name, parts in self.stacks.items()}


class HetLoRACluster:
    """A rank-r_max adapter at the scale of r_max: updates zero-padded up and averaged with
    sparsity weights; a client of rank r gets the truncation, s_r B_r A_r = s_g B_g[:, :r] A_g[:r]."""

    def __init__(self, start: AdapterState):
        self.state = start.clone()

    def fit(self, updates: list[Update]) -> None:
        lora = {}
        for name, current in self.state.lora.items():
            weights = sparsity_weights(updates, name, "norm")
            padded = [to_global(u.state.lora[name], current.rank, current.scale) for u in updates]
            lora[name] = LoRAFactors(
                weighted_average([f.A for f in padded], weights), weighted_average([f.B for f in padded], weights), current.scale
            )
        examples = example_weights(updates)
        extra = {name: weighted_average([u.state.extra[name] for u in updates], examples) for name in self.state.extra}
        self.state = AdapterState(lora, extra)

    def for_rank(self, template: AdapterState) -> AdapterState:
        rank = template.rank()
        lora = {name: to_client(f, rank, template.lora[name].scale) for name, f in self.state.lora.items()}
        return AdapterState(lora, {n: t.clone() for n, t in self.state.extra.items()})

    def delta(self, name: str) -> Tensor:
        return self.state.lora[name].delta()

    def state_dict(self) -> dict[str, Tensor]:
        return self.state.to_tensors()

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        self.state = AdapterState.from_tensors(tensors)


# -- client ------------------------------------------------------------------------------------------------


class ClusteredLoRAClient(BaseClient):
    """Warm-up: trains its own adapter and keeps it in the client store between warm-up rounds.
    Clustered: trains its cluster's adapter at its own rank and keeps nothing."""

    _clustered: bool = False  # whether this round's download came from a cluster (set by compose)

    def compose(self, round: int, download: AdapterState) -> AdapterState:
        self._clustered = CLUSTER_KEY in download.control
        if download.lora:
            return AdapterState(download.lora, download.extra, download.base)
        stored = self.context.store.get(self.client_id)  # a later warm-up round: its own adapter
        if stored is not None:
            return AdapterState.from_tensors(stored)
        return self.workbench.initial_state(self.context.rank)

    def keep(self, round: int, start: AdapterState, trained: AdapterState) -> None:
        if self._clustered:
            self.context.store.discard(self.client_id)
        else:
            self.context.store.put(self.client_id, trained.to_tensors())


# -- server ------------------------------------------------------------------------------------------------


class ClusteredLoRA(BaseServer):
    spec = SPECS["clustered-lora"]
    client_class = ClusteredLoRAClient

    def __init__(self, context, params):
        super().__init__(context, params)
        rounds = context.config.federation.rounds
        if rounds <= params.warmup_rounds:
            raise ConfigError(
                f"clustered-lora with federation.rounds={rounds} never leaves its {params.warmup_rounds} warm-up round(s)",
                "set algorithm.warmup_rounds below federation.rounds",
            )
        self.templates = RankTemplates(context.initial_state)
        self.max_rank = max(context.client_ranks) if context.client_ranks else context.config.model.lora.rank
        self.start = self.templates(self.max_rank)  # the common start: every client gets its truncation
        self.global_state = self.start.clone()
        self.clusters: list[int] | None = None
        self.models: list[FlexLoRACluster | HetLoRACluster] = []
        self.warmup: dict[int, Update] = {}

    @property
    def num_clusters(self) -> int:
        return len(self.models)

    def new_model(self) -> FlexLoRACluster | HetLoRACluster:
        if self.params.aggregation == "flexlora":
            return FlexLoRACluster(self.start.extra)
        return HetLoRACluster(self.start)

    def rank_of(self, client_id: int) -> int:
        ranks = self.context.client_ranks
        return ranks[client_id] if ranks else self.context.config.model.lora.rank

    # -- protocol ------------------------------------------------------------------------------------------
    def sample(self, round: int, available: list[int]) -> list[int]:
        if self.clusters is None:
            return sorted(available)  # warm-up: every available client trains its own adapter
        return super().sample(round, available)

    def configure(self, round: int, client_id: int) -> AdapterState:
        template = self.templates(self.rank_of(client_id))
        if self.clusters is None:
            if client_id in self.warmup:
                return AdapterState()  # it continues from its own warm-up adapter
            return HetLoRACluster(self.start).for_rank(template)
        own = self.clusters[client_id]
        state = self.models[own].for_rank(template)
        state.control[CLUSTER_KEY] = torch.tensor(own, dtype=torch.int64)
        return state

    def check(self, update: Update) -> None:
        modules = set(self.start.lora)
        if set(update.state.lora) != modules or any(not f.complete for f in update.state.lora.values()):
            raise UpdateError(f"client {update.client_id} must upload both factors of every module: {sorted(modules)}")
        rank = update.state.rank()
        if rank > self.max_rank:
            raise UpdateError(f"client {update.client_id} uploaded rank {rank}, above the largest client rank {self.max_rank}")

    def aggregate(self, round: int, updates: list[Update]) -> None:
        for update in updates:
            self.check(update)
        if self.clusters is None:
            for update in updates:
                self.warmup[update.client_id] = update
            if round >= self.params.warmup_rounds and self.warmup:
                self.allocate()
            return
        groups: dict[int, list[Update]] = {}
        for update in updates:
            groups.setdefault(self.clusters[update.client_id], []).append(update)
        for own, members in sorted(groups.items()):
            self.models[own].fit(members)

    def allocate(self) -> None:
        """Cluster the warm-up adapters and build each cluster's adapter from its members' ones."""
        ids = sorted(self.warmup)
        states = [self.warmup[c].state for c in ids]
        if all(torch.count_nonzero(f.B) == 0 for s in states for f in s.lora.values()):
            raise UpdateError(
                "every warm-up adapter has B = 0: clustering needs trained adapters", "give the warm-up rounds training steps"
            )
        labels = choose_clusters(delta_distances(states), self.params.max_clusters)
        self.models = []
        for cluster in range(int(labels.max()) + 1):
            model = self.new_model()
            model.fit([self.warmup[c] for c, label in zip(ids, labels) if label == cluster])
            self.models.append(model)
        clusters = [-1] * self.context.num_clients
        for client, label in zip(ids, labels):
            clusters[client] = int(label)
        largest = int(np.argmax(np.bincount(labels)))
        self.clusters = [largest if c < 0 else c for c in clusters]  # clients never seen join the largest cluster
        self.warmup = {}

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        tensors = super().state_dict()
        if self.clusters is not None:
            tensors["clustered.clusters"] = torch.tensor(self.clusters, dtype=torch.int64)
        for cluster, model in enumerate(self.models):
            tensors.update({f"cluster{cluster}.{k}": v for k, v in model.state_dict().items()})
        for client, update in self.warmup.items():
            tensors.update({f"warmup{client}.{k}": v for k, v in update.state.to_tensors().items()})
            tensors[f"warmup{client}.examples"] = torch.tensor(update.num_examples, dtype=torch.int64)
        return tensors

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        super().load_state_dict(tensors)
        self.clusters = tensors["clustered.clusters"].tolist() if "clustered.clusters" in tensors else None
        clusters: dict[int, dict[str, Tensor]] = {}
        warmup: dict[int, dict[str, Tensor]] = {}
        for key, tensor in tensors.items():
            head, _, rest = key.partition(".")
            if head.startswith("cluster") and head[len("cluster") :].isdigit():
                clusters.setdefault(int(head[len("cluster") :]), {})[rest] = tensor
            elif head.startswith("warmup") and head[len("warmup") :].isdigit():
                warmup.setdefault(int(head[len("warmup") :]), {})[rest] = tensor
        self.models = []
        for cluster in sorted(clusters):
            model = self.new_model()
            model.load_state_dict(clusters[cluster])
            self.models.append(model)
        self.warmup = {}
        for client, parts in warmup.items():
            examples = int(parts.pop("examples"))
            self.warmup[client] = Update(client, examples, AdapterState.from_tensors(parts))
