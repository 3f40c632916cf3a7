"""BaseServer and BaseClient: what every algorithm subclasses.

The runner owns time and transport; these classes own the math. They never sleep, read clocks or
open sockets, so the prototype runner, the event-driven simulator and the Flower engine can all
drive the same objects. A new algorithm overrides only what it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from pydantic import BaseModel
from torch import Tensor

from atoll.fl.capabilities import AlgorithmSpec, Capabilities, NoParams
from atoll.config import Config, TrainConfig
from atoll.fl.state import AdapterState, LoRAFactors, Update, example_weights
from atoll.fl.store import ClientStore
from atoll.fl.trainer import TrainHooks, TrainPlan
from atoll.fl.workbench import Trainable, Workbench
from atoll.seeding import numpy_rng


def weighted_average(tensors: list[Tensor], weights: list[float]) -> Tensor:
    """sum_k w_k x_k, accumulated in float32 and returned in the inputs' dtype."""
    total = torch.zeros_like(tensors[0], dtype=torch.float32)
    for tensor, weight in zip(tensors, weights):
        total.add_(tensor.float(), alpha=float(weight))
    return total.to(tensors[0].dtype)


def average_states(
    states: list[AdapterState],
    weights: list[float],
    lora_A: bool = True,
    lora_B: bool = True,
    extra: bool = True,
    base: AdapterState | None = None,
) -> AdapterState:
    """Factor-wise weighted average (FedAvg on LoRA tensors). Factors not averaged are taken from
    ``base`` (default: the first state). All states must share ranks (see HetLoRA for mixed)."""
    reference = base if base is not None else states[0]
    result = reference.clone()
    for name, factors in result.lora.items():
        if lora_A:
            factors.A = weighted_average([s.lora[name].A for s in states], weights)
        if lora_B:
            factors.B = weighted_average([s.lora[name].B for s in states], weights)
    if extra:
        for name in result.extra:
            result.extra[name] = weighted_average([s.extra[name] for s in states], weights)
    return result


@dataclass(frozen=True)
class AsyncRule:
    """How updates that arrive one at a time or in buffers are folded in, weighted by staleness t
    (server versions since the client downloaded). FedAsync (Xie et al., "Asynchronous Federated
    Optimization", 2019): x <- (1 - a_t) x + a_t x_k, a_t = alpha * s(t). FedBuff (Nguyen et al.,
    "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022):
    x <- x + server_lr * (1/K) sum_k s(t_k) (x_k - x_start_k)."""

    alpha: float = 0.6
    staleness: str = "constant"  # constant | polynomial | hinge
    a: float = 0.5
    b: float = 4.0
    server_lr: float = 1.0

    def weight(self, staleness: int) -> float:
        """s(t): constant 1; polynomial (t + 1)^-a; hinge 1 if t <= b else 1 / (a (t - b) + 1)."""
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        if self.staleness == "constant":
            return 1.0
        if self.staleness == "polynomial":
            return float((staleness + 1) ** (-self.a))
        if self.staleness == "hinge":
            return 1.0 if staleness <= self.b else 1.0 / (self.a * (staleness - self.b) + 1.0)
        raise ValueError(f"unknown staleness function '{self.staleness}'")


def _async_pairs(current: AdapterState, incoming: AdapterState, client_id: int):
    """(container, key, current tensor, incoming tensor) for every model tensor both carry (LoRA
    factors present in both, extras, base deltas); control data is the algorithm's own business."""
    from atoll.errors import UpdateError

    pairs = []
    for name, factors in incoming.lora.items():
        if name not in current.lora:
            raise UpdateError(f"client {client_id} sent module '{name}' the global adapter does not have")
        mine = current.lora[name]
        for which in ("A", "B"):
            theirs_t, mine_t = getattr(factors, which), getattr(mine, which)
            if theirs_t is None or mine_t is None:  # a factor the message leaves out
                continue
            if theirs_t.shape != mine_t.shape:
                raise UpdateError(
                    f"client {client_id} sent {name}.{which} of shape {tuple(theirs_t.shape)}, the global one is {tuple(mine_t.shape)}",
                    "different ranks need an algorithm that overrides aggregate_async",
                )
            pairs.append(("lora", (name, which), mine_t, theirs_t))
    for kind in ("extra", "base"):
        for key, tensor in getattr(incoming, kind).items():
            mine_t = getattr(current, kind).get(key)
            if mine_t is None:
                raise UpdateError(f"client {client_id} sent {kind} tensor '{key}' the global adapter does not have")
            if tensor.numel() and mine_t.numel():
                pairs.append((kind, key, mine_t, tensor))
    return pairs


def _replaced(state: AdapterState, new: dict) -> AdapterState:
    """A copy of ``state`` (sharing untouched tensors) with the tensors in ``new`` replaced."""
    lora = {}
    for name, f in state.lora.items():
        lora[name] = LoRAFactors(new.get(("lora", (name, "A")), f.A), new.get(("lora", (name, "B")), f.B), f.scale)
    extra = {k: new.get(("extra", k), t) for k, t in state.extra.items()}
    base = {k: new.get(("base", k), t) for k, t in state.base.items()}
    return AdapterState(lora, extra, base, dict(state.control))


def mix_states(current: AdapterState, incoming: AdapterState, alpha: float, client_id: int = -1) -> AdapterState:
    """(1 - alpha) * current + alpha * incoming on every tensor the incoming state carries."""
    new = {}
    for kind, key, mine, theirs in _async_pairs(current, incoming, client_id):
        new[(kind, key)] = ((1.0 - alpha) * mine.float() + alpha * theirs.float()).to(mine.dtype)
    return _replaced(current, new)


@dataclass
class ServerContext:
    """What a server may know: the config, client sizes and ranks, the initial adapter, and a way
    to evaluate a state on the global test set (None in pure-math tests)."""

    config: Config
    client_sizes: list[int]
    client_ranks: list[int]
    initial_state: Callable[[int], AdapterState]
    evaluator: Callable[[AdapterState], dict[str, float]] | None = None
    # module name -> copy of its pristine frozen weight W0 (ILoRA's QR init); None in pure-math tests
    base_weight: Callable[[str], Tensor] | None = None

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    @property
    def global_rank(self) -> int:
        """The clients' rank when they all share one (rank_cycle: [16] means rank 16), else lora.rank."""
        ranks = set(self.client_ranks)
        return ranks.pop() if len(ranks) == 1 else self.config.model.lora.rank

    @property
    def seed(self) -> int:
        return self.config.seed


@dataclass
class ClientContext:
    """A client: its data (indices into the shared tokenised pool), rank, and shared machinery."""

    client_id: int
    train_indices: np.ndarray
    test_indices: np.ndarray
    rank: int
    config: Config
    workbench: Workbench | None
    store: ClientStore
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return int(len(self.train_indices))


def local_steps(train: TrainConfig, num_examples: int) -> int:
    """Optimizer steps per round: train.local_steps, else ceil(epochs * n / (batch * accum))."""
    if train.local_steps is not None:
        return train.local_steps
    per_step = train.batch_size * train.grad_accum
    return max(1, int(np.ceil(train.local_epochs * num_examples / per_step)))


class BaseClient:
    """Local training on the live workbench. Override the small hooks, rarely ``run`` itself."""

    def __init__(self, context: ClientContext, params: BaseModel):
        self.context = context
        self.params = params

    @property
    def client_id(self) -> int:
        return self.context.client_id

    @property
    def workbench(self) -> Workbench:
        assert self.context.workbench is not None, "this client has no workbench (pure-math test)"
        return self.context.workbench

    # -- hooks an algorithm overrides --------------------------------------------------------------
    def compose(self, round: int, download: AdapterState) -> AdapterState:
        """The full adapter to train from: the download plus any private parts (default: download)."""
        return download

    def trainable(self, round: int) -> Trainable:
        return Trainable()

    def hooks(self, round: int, start: AdapterState) -> TrainHooks:
        return TrainHooks()

    def keep(self, round: int, start: AdapterState, trained: AdapterState) -> None:
        """Store private parts after training (default: nothing is private)."""

    def upload(self, round: int, start: AdapterState, trained: AdapterState) -> AdapterState:
        """What leaves the client (default: the whole trained adapter)."""
        return trained

    def plan(self, round: int) -> TrainPlan:
        train = self.context.config.train
        return TrainPlan(
            steps=local_steps(train, self.context.num_examples),
            lr=train.lr * train.round_decay ** (round - 1),
            grad_accum=train.grad_accum,
            weight_decay=train.weight_decay,
            schedule=train.schedule,
            warmup_steps=train.warmup_steps,
            max_grad_norm=train.max_grad_norm,
            optimizer=train.optimizer,
        )

    # -- the protocol --------------------------------------------------------------------------------
    def run(self, round: int, download: AdapterState) -> Update:
        start = self.compose(round, download)
        self.workbench.load(start)
        plan = self.plan(round)
        plan.hooks = self.hooks(round, start)
        metrics = self.workbench.train(
            self.context.train_indices,
            plan,
            self.context.config.train.batch_size,
            rng_keys=(self.client_id, round),
            trainable=self.trainable(round),
            group_by_length=self.context.config.train.group_by_length,
        )
        trained = self.workbench.read()
        trained.base = start.base
        self.keep(round, start, trained)
        return Update(self.client_id, self.context.num_examples, self.upload(round, start, trained), metrics)

    def evaluation_state(self, download: AdapterState) -> AdapterState:
        """The adapter this client would use for inference (personal algorithms add their parts)."""
        return self.compose(0, download)

    def personal_adapter(self, download: AdapterState) -> AdapterState:
        """The client's inference model as one LoRA adapter, for export (``run.export_personal``).
        Valid when ``evaluate`` is this class's (the inference adapter is ``evaluation_state``);
        a client that evaluates otherwise overrides this or its server refuses the export."""
        return self.evaluation_state(download)

    def evaluate(self, download: AdapterState, indices: np.ndarray | None = None) -> dict[str, float]:
        """Metrics on the client's local test split (or ``indices``) with its inference adapter."""
        self.workbench.load(self.evaluation_state(download))
        chosen = self.context.test_indices if indices is None else indices
        return self.workbench.evaluate(chosen, max_generate=self.context.config.eval.max_generate)


class BaseServer:
    """Sampling, per-client configuration, aggregation and global evaluation.

    What an algorithm is and supports is declared in one place, its ``spec`` (an
    :class:`~atoll.algorithms.catalog.AlgorithmSpec`): ``name``, ``paper``, ``Params`` and
    ``capabilities`` are read from it. BaseServer itself is FedAvg (FedIT's rule).
    """

    spec: ClassVar[AlgorithmSpec | None] = None
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    capabilities: ClassVar[Capabilities] = Capabilities(asynchronous=True, weighted_mean=True)
    client_class: ClassVar[type[BaseClient]] = BaseClient

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec")
        if spec is not None:
            cls.name, cls.paper, cls.Params, cls.capabilities = spec.name, spec.paper, spec.Params, spec.capabilities

    def __init__(self, context: ServerContext, params: BaseModel):
        self.context = context
        self.params = params
        self.global_state: AdapterState = context.initial_state(context.global_rank)

    @classmethod
    def prepare_workbench(cls, workbench: Workbench, config: Config, params: BaseModel) -> None:
        """Called once after the live model is built, before any state is read from it: an
        algorithm that needs extra adapters or custom layers (FedDPA, FedLEASE, RAVAN) installs
        them here. Default: nothing."""

    # -- protocol --------------------------------------------------------------------------------------
    def sample(self, round: int, available: list[int]) -> list[int]:
        """A uniform sample of ceil(sample_rate * N) clients (at least 1), from (seed, round)."""
        rate = self.context.config.federation.sample_rate
        count = min(len(available), max(1, int(np.ceil(rate * self.context.num_clients - 1e-9))))
        if count >= len(available):
            return sorted(available)
        chosen = numpy_rng(self.context.seed, "sample", round).choice(sorted(available), size=count, replace=False)
        return sorted(int(c) for c in chosen)

    def configure(self, round: int, client_id: int) -> AdapterState:
        """What client ``client_id`` downloads this round (default: the global adapter)."""
        return self.global_state

    def aggregate(self, round: int, updates: list[Update]) -> None:
        """FedAvg of every uploaded tensor, weighted by example counts (FedIT)."""
        if not updates:
            return
        self.global_state = average_states([u.state for u in updates], example_weights(updates), base=self.global_state)

    def aggregate_async(self, version: int, update: Update, staleness: int, rule: AsyncRule) -> None:
        """Take one update (FedAsync): x <- (1 - a_t) x + a_t x_k with a_t = alpha * s(staleness),
        on every tensor the update carries. ``version`` counts server updates from 1. Algorithms
        whose math is inherently synchronous declare ``asynchronous=False`` in their capabilities."""
        alpha = rule.alpha * rule.weight(staleness)
        self.global_state = mix_states(self.global_state, update.state, alpha, update.client_id)

    def aggregate_buffered(
        self, version: int, updates: list[Update], staleness: list[int], starts: list[AdapterState], rule: AsyncRule
    ) -> None:
        """Take a buffer of K updates (FedBuff): x <- x + server_lr * (1/K) sum_k s(t_k) (x_k - start_k),
        where start_k is what client k downloaded."""
        if not updates:
            return
        total: dict = {}
        for update, stale, start in zip(updates, staleness, starts):
            weight = rule.weight(stale) / len(updates)
            starting = {(kind, key): t for kind, key, _, t in _async_pairs(self.global_state, start, update.client_id)}
            for kind, key, _, theirs in _async_pairs(self.global_state, update.state, update.client_id):
                origin = starting.get((kind, key))
                if origin is None:
                    continue
                delta = (theirs.float() - origin.float()) * weight
                total[(kind, key)] = delta if (kind, key) not in total else total[(kind, key)] + delta
        current = {(kind, key): mine for kind, key, mine, _ in _async_pairs(self.global_state, self.global_state, -1)}
        new = {slot: (current[slot].float() + rule.server_lr * delta).to(current[slot].dtype) for slot, delta in total.items()}
        self.global_state = _replaced(self.global_state, new)

    def evaluate(self, round: int) -> dict[str, float]:
        """Metrics of the global adapter on the global test set."""
        if self.context.evaluator is None or not self.capabilities.global_model:
            return {}
        return self.context.evaluator(self.global_state)

    # -- checkpoints ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Everything needed to resume: the global adapter plus algorithm state (override to add)."""
        return {f"global.{k}": v for k, v in self.global_state.to_tensors().items()}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        own = {k[len("global.") :]: v for k, v in tensors.items() if k.startswith("global.")}
        self.global_state = AdapterState.from_tensors(own)


def pad_factors(factors: LoRAFactors, rank: int) -> LoRAFactors:
    """Zero-pad A (rows) and B (columns) to ``rank``; the product B A is unchanged."""
    extra = rank - factors.rank
    if extra < 0:
        raise ValueError(f"cannot pad rank {factors.rank} down to {rank}")
    if extra == 0:
        return factors
    A = torch.cat([factors.A, factors.A.new_zeros(extra, factors.A.shape[1])], 0)
    B = torch.cat([factors.B, factors.B.new_zeros(factors.B.shape[0], extra)], 1)
    return LoRAFactors(A, B, factors.scale)
