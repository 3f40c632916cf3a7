"""Configuration of hybrid inference (``atoll hybrid eval CONFIG``, ``chat``): pydantic sections
with a default and a one-line description for every key. Importing this module imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from atoll.errors import ConfigError

FUSION_METHODS = ("edge", "cloud", "weighted", "proxy", "router")
CLIENT_TEST = "client-test"  # task.source: the held-out examples of edge.client in edge.run
PII_KINDS = ("person", "email", "phone", "address", "id_number", "card_number")


class Section(BaseModel):
    """Unknown keys are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EdgeConfig(Section):
    model: str = Field("atoll-edge", description="the on-device causal LM: a registry name or a local Hugging Face directory")
    adapter: str | None = Field(
        None, description="a PEFT LoRA adapter directory for the edge model (e.g. a run's personal/client_K); proxy-tuning needs one"
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the edge model")
    run: str | None = Field(
        None,
        description="a federated run directory (atoll run): the edge uses edge.client's adapter from it and the run's model",
    )
    client: int | None = Field(
        None, ge=0, description="with edge.run: the client whose adapter the edge loads (personal/client_K, else the global adapter/)"
    )


MAX_WORKERS = 64
MAX_CACHE_ENTRIES = 100_000


def check_load_options(workers: int, cache_entries: int) -> None:
    """One-line errors for ``--workers`` and ``--cache-entries``."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"--workers must be an integer from 1 to {MAX_WORKERS} (got {workers!r})", "e.g. --workers 2 on a 2-core machine")
    if isinstance(cache_entries, bool) or not isinstance(cache_entries, int) or not 0 <= cache_entries <= MAX_CACHE_ENTRIES:
        raise ConfigError(
            f"--cache-entries must be an integer from 0 to {MAX_CACHE_ENTRIES} (got {cache_entries!r})", "0 turns the prefix cache off"
        )


class CloudConfig(Section):
    url: str | None = Field(
        None, description="base URL of an OpenAI-compatible server with log-probabilities, e.g. http://127.0.0.1:8000/v1"
    )
    model: str = Field("atoll-cloud", description="model name sent in requests (and served, with serve: true)")
    serve: bool = Field(
        False, description="eval: start `atoll hybrid serve-cloud <model>` on a free loopback port for the run (url must be null)"
    )
    serve_delay_ms: float = Field(0.0, ge=0, description="with serve: delay every response by this many ms (the cloud slowed on purpose)")
    serve_jitter_ms: float = Field(0.0, ge=0, description="with serve: add a uniform random 0..jitter ms to each delay")
    serve_workers: int = Field(
        1, ge=1, le=MAX_WORKERS, description="with serve: requests the cloud serves at once (threads sharing its model)"
    )
    serve_cache_entries: int = Field(
        0, ge=0, le=MAX_CACHE_ENTRIES, description="with serve: prompt-prefix KV caches the cloud keeps (LRU; 0: none)"
    )
    top_k: int = Field(5, gt=0, le=100, description="top-k log-probabilities asked of the cloud per position (OpenAI allows <= 5)")
    deadline_ms: float = Field(200.0, gt=0, description="per-token deadline: past it the edge token stands and a miss is counted")
    timeout_s: float = Field(30.0, gt=0, description="connect/read timeout of the HTTP client (the deadline is what bounds a token)")
    api_key_env: str | None = Field(None, description="name of an environment variable holding a bearer token for the cloud, if any")
    eos_strings: list[str] = Field(
        default_factory=lambda: ["</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<eos>"],
        description="cloud token strings that mean end of text (mapped to the edge's EOS)",
    )


class FusionConfig(Section):
    methods: list[Literal["edge", "cloud", "weighted", "proxy", "router"]] = Field(
        default_factory=lambda: ["edge", "cloud", "weighted", "router"],
        description="eval: methods compared side by side; chat: the first one is used",
    )
    edge_weight: float = Field(0.5, ge=0, le=1, description="weighted: log-linear weight of the edge (the cloud gets 1 - this)")
    alpha: float = Field(1.0, ge=0, description="proxy: strength of the tuned-minus-base edge offset added to the cloud")
    support: Literal["cloud", "union"] = Field(
        "cloud",
        description="cloud: fuse on the cloud's top-k only; union: also the edge's top-k, with the cloud's bound min(p_k, residual)",
    )
    unshared: Literal["prefix", "drop"] = Field(
        "prefix", description="a cloud token with no identical edge token: prefix = to the longest edge token it starts with; drop"
    )

    @model_validator(mode="after")
    def _some_methods(self) -> "FusionConfig":
        if not self.methods:
            raise ValueError("fusion.methods must name at least one method")
        return self


class PrivacyConfig(Section):
    policy: Literal["edge_only", "redact", "off"] = Field(
        "edge_only",
        description="a prompt with personal data: edge_only = the edge answers alone; redact = the cloud sees placeholders; off",
    )
    entities: list[Literal["person", "email", "phone", "address", "id_number", "card_number"]] = Field(
        default_factory=lambda: list(PII_KINDS), description="kinds of personal data detected"
    )
    phone_region: str = Field("US", description="default region for phone numbers without a + country code (ISO 3166, e.g. GB)")
    address_countries: list[str] = Field(default_factory=lambda: ["US", "GB", "CA"], description="postal address formats searched")
    id_formats: list[str] = Field(
        default_factory=lambda: ["us.ssn", "iban", "es.dni", "fr.nir", "it.codicefiscale"],
        description="python-stdnum modules whose numbers count as ID numbers",
    )
    names: list[str] = Field(default_factory=list, description="extra personal names always treated as names (e.g. your contacts)")


class TaskConfig(Section):
    source: str = Field(
        "synthetic-sft",
        description="data source (built-in name or local .json/.jsonl/.csv/.parquet file), or client-test: edge.client's held-out examples in edge.run",
    )
    prompt_column: str | None = Field(None, description="column with the prompt (default: the source's)")
    reference_column: str | None = Field(None, description="column with the reference continuation (default: the source's)")
    template: str = Field("{prompt}", description="how a prompt is shown to both models; {prompt} is replaced")
    metric: Literal["next_token_accuracy", "exact_match", "contains"] = Field(
        "next_token_accuracy",
        description="next_token_accuracy: teacher-forced over the reference; exact_match / contains: greedy generation vs reference",
    )
    max_examples: int = Field(20, gt=0, description="examples evaluated (the first N of a seeded shuffle)")
    max_new_tokens: int = Field(24, gt=0, description="tokens per example (generated, or scored along the reference)")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="generation stops at any of these strings (not when scoring)")


class HybridRunConfig(Section):
    dir: str | None = Field(None, description="run directory (default: <root>/<name>-<time>)")
    root: str = Field("runs", description="parent folder of run directories")
    threads: int = Field(1, gt=0, description="torch CPU threads")


class HybridConfig(Section):
    name: str = Field("hybrid", description="run name, used in the run directory name")
    seed: int = Field(0, description="seed of the example shuffle")
    edge: EdgeConfig = Field(default_factory=EdgeConfig, description="the on-device model")
    cloud: CloudConfig = Field(default_factory=CloudConfig, description="the black-box cloud model and the deadline")
    fusion: FusionConfig = Field(default_factory=FusionConfig, description="fusion rules")
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description="the on-device privacy detector")
    task: TaskConfig = Field(default_factory=TaskConfig, description="eval: data and metric")
    run: HybridRunConfig = Field(default_factory=HybridRunConfig, description="run directory and threads")

    @model_validator(mode="after")
    def _consistent(self) -> "HybridConfig":
        if self.cloud.serve and self.cloud.url is not None:
            raise ValueError("cloud.serve starts its own server: leave cloud.url null, or set cloud.serve to false")
        defaults = CloudConfig()
        for key in ("serve_delay_ms", "serve_jitter_ms", "serve_workers", "serve_cache_entries"):
            if not self.cloud.serve and getattr(self.cloud, key) != getattr(defaults, key):
                raise ValueError(f"cloud.{key} has no effect without cloud.serve: true (a server at cloud.url is configured where it runs)")
        needs_cloud = any(method != "edge" for method in self.fusion.methods)
        if needs_cloud and self.cloud.url is None and not self.cloud.serve:
            raise ValueError("fusion needs a cloud: set cloud.url (an OpenAI-compatible /v1 endpoint) or cloud.serve: true")
        if self.edge.run is not None and self.edge.adapter is not None:
            raise ValueError("edge.run brings its client's adapter: leave edge.adapter null, or drop edge.run")
        if self.edge.run is not None and self.edge.client is None:
            raise ValueError("edge.run needs edge.client: the client whose adapter the edge loads")
        if self.edge.client is not None and self.edge.run is None:
            raise ValueError("edge.client needs edge.run: the federated run directory it belongs to")
        if self.task.source == CLIENT_TEST and self.edge.run is None:
            raise ValueError(f"task.source {CLIENT_TEST} needs edge.run and edge.client (whose held-out examples to use)")
        if "proxy" in self.fusion.methods and self.edge.adapter is None and self.edge.run is None:
            raise ValueError("proxy-tuning needs a tuned edge: set edge.adapter to a PEFT adapter directory (or edge.run), or drop 'proxy'")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _owner(path: tuple) -> type[BaseModel] | None:
    cls: type[BaseModel] = HybridConfig
    for part in path:
        field = cls.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        cls = annotation
    return cls


def _describe(error: ValidationError) -> str:
    """One line for the first validation error: the dotted key, the problem, what is allowed."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        owner = _owner(loc[:-1])
        allowed = ", ".join(owner.model_fields) if owner else "see `atoll hybrid eval --help`"
        return f"unknown key '{key}'; allowed here: {allowed}"
    message = str(first["msg"]).removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, dict) or not loc else f" (got {got!r})"
    return f"{key}: {message}{shown}" if key else message


def build_hybrid_config(tree: dict[str, Any]) -> HybridConfig:
    try:
        return HybridConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load_hybrid_config(path: str | Path | None, overrides: list[str] | None = None) -> HybridConfig:
    """A YAML file (or the defaults when ``path`` is None) plus ``a.b=c`` overrides."""
    from atoll.config import apply_override, read_yaml

    tree: dict[str, Any] = read_yaml(path) if path is not None else {}
    for assignment in overrides or []:
        apply_override(tree, assignment)
    return build_hybrid_config(tree)
