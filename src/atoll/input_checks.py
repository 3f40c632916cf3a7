"""The resolve step's checks of what a config asks for, beyond types and bounds (no torch).

- **Keys that would do nothing.** A key set away from its default while the switch that makes it
  matter is off (``realistic.*`` without ``mode: realistic``, ``flower.*`` without ``engine:
  flower``, FedBuff settings under another paradigm, ...) is an error, not silently ignored.
  ``system`` is not among them: in prototype mode a sys.yaml sets the ranks, and the resolve step
  refuses one that sets none.
  :data:`INERT_RULES` lists them; a new section adds its own rule there.
- **Local data files.** Read and checked (format, encoding, columns, values) before any model.
- **The model.** The name resolves offline, and ``model.max_length`` fits its positions.
- **The realistic target.** ``realistic.target_metric`` is a metric the task reports, and a
  fraction metric's ``target_value`` lies in [0, 1].
- **The run directory** of a new run can be created where the config puts it (called by the CLI
  and by ``RunDir.check_new``, not by the resolve step: a resumed run is checked where it is).

Each problem is one ConfigError (or ModelError) line naming the key and the fix.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel

from atoll.config import FRACTION_METRICS, TASK_METRICS, Config
from atoll.data.sources import BUILTIN_SOURCES, load_source, local_file
from atoll.errors import ConfigError, DataError, ModelError
from atoll.models import locate


@dataclass(frozen=True)
class InertRule:
    """``key`` (a dotted key or section) takes effect only when ``applies(config)``. The message
    says the key has no effect ``unless`` (e.g. 'without mode: realistic') and offers ``fix``
    (e.g. 'set mode: realistic'). Keys under ``key`` named in ``switches`` are exempt: they are
    the switch."""

    key: str
    applies: Callable[[Config], bool]
    unless: str
    fix: str
    switches: tuple[str, ...] = ()


def _asynchronous(config: Config) -> bool:
    return config.realistic.paradigm in ("fedasync", "fedbuff")


def _rule(key: str, applies: Callable[[Config], bool], needs: str, switches: tuple[str, ...] = ()) -> InertRule:
    """The common rule: ``key`` needs the setting ``needs``."""
    return InertRule(key, applies, f"without {needs}", f"set {needs}", switches)


INERT_RULES: list[InertRule] = [
    _rule("realistic", lambda c: c.mode == "realistic", "mode: realistic"),
    _rule("realistic.sync", lambda c: c.realistic.paradigm == "sync", "realistic.paradigm: sync"),
    _rule("realistic.fedasync", lambda c: c.realistic.paradigm == "fedasync", "realistic.paradigm: fedasync"),
    _rule("realistic.fedbuff", lambda c: c.realistic.paradigm == "fedbuff", "realistic.paradigm: fedbuff"),
    _rule("realistic.staleness", _asynchronous, "realistic.paradigm: fedasync or fedbuff"),
    _rule("realistic.concurrency", _asynchronous, "realistic.paradigm: fedasync or fedbuff"),
    _rule("flower", lambda c: c.engine == "flower", "engine: flower"),
    _rule("flower.secagg", lambda c: c.flower.secagg.enabled, "flower.secagg.enabled: true", ("enabled",)),
    _rule("flower.dp", lambda c: c.flower.dp.mode != "none", "a flower.dp.mode other than none", ("mode",)),
    _rule("flower.superlink", lambda c: c.flower.mode == "deployment", "flower.mode: deployment"),
    _rule("flower.root_certificates", lambda c: c.flower.mode == "deployment", "flower.mode: deployment"),
    _rule("flower.insecure", lambda c: c.flower.mode == "deployment", "flower.mode: deployment"),
    _rule("flower.actors", lambda c: c.flower.mode == "simulation", "flower.mode: simulation"),
    _rule("partition.alpha", lambda c: c.partition.name in ("dirichlet", "quantity"), "partition.name: dirichlet or quantity"),
    _rule("partition.shards_per_client", lambda c: c.partition.name == "shards", "partition.name: shards"),
    _rule("partition.column", lambda c: c.partition.name == "natural", "partition.name: natural"),
    InertRule(
        "train.local_epochs",
        lambda c: c.train.local_steps is None,
        "while train.local_steps is set (it takes precedence)",
        "set train.local_steps: null to train by epochs",
    ),
    InertRule(
        "run.keep_checkpoints", lambda c: c.mode != "realistic", "in realistic mode (it keeps no checkpoints)", "use mode: prototype"
    ),
    _rule("privacy.dp", lambda c: c.privacy.dp.mode != "none", "a privacy.dp.mode other than none", ("mode",)),
    _rule("privacy.dp.target_quantile", lambda c: c.privacy.dp.mode == "adaptive", "privacy.dp.mode: adaptive"),
    _rule("privacy.dp.clip_lr", lambda c: c.privacy.dp.mode == "adaptive", "privacy.dp.mode: adaptive"),
    _rule("privacy.dp.count_noise_stddev", lambda c: c.privacy.dp.mode == "adaptive", "privacy.dp.mode: adaptive"),
    _rule("privacy.dpsgd", lambda c: c.privacy.dpsgd.enabled, "privacy.dpsgd.enabled: true", ("enabled",)),
    _rule("privacy.secagg", lambda c: c.privacy.secagg.enabled, "privacy.secagg.enabled: true", ("enabled",)),
    _rule("robust.byzantine", lambda c: c.robust.rule in ("krum", "multi-krum"), "robust.rule: krum or multi-krum"),
    _rule("robust.keep", lambda c: c.robust.rule == "multi-krum", "robust.rule: multi-krum"),
    _rule("robust.trim_fraction", lambda c: c.robust.rule == "trimmed-mean", "robust.rule: trimmed-mean"),
    _rule("robust.norm_bound", lambda c: c.robust.rule == "norm-bounding", "robust.rule: norm-bounding"),
    _rule("robust.root_examples", lambda c: c.robust.rule == "fltrust", "robust.rule: fltrust"),
    _rule("robust.noise_factor", lambda c: c.robust.rule == "flame", "robust.rule: flame"),
    _rule("robust.validation", lambda c: c.robust.validation.enabled, "robust.validation.enabled: true", ("enabled",)),
]

_DEFAULTS = Config()


def _value_at(tree: Any, key: str) -> Any:
    for part in key.split("."):
        tree = getattr(tree, part)
    return tree


def _first_difference(value: Any, default: Any, key: str, switches: tuple[str, ...]) -> tuple[str, Any] | None:
    """The first leaf key under ``key`` whose value differs from the default (None when all agree)."""
    if isinstance(value, BaseModel) and isinstance(default, BaseModel):
        for name in type(value).model_fields:
            if name in switches:
                continue
            found = _first_difference(getattr(value, name), getattr(default, name), f"{key}.{name}", ())
            if found:
                return found
        return None
    return None if value == default else (key, value)


def check_inert_keys(config: Config) -> None:
    """Refuse a key set away from its default where it has no effect (see :data:`INERT_RULES`)."""
    for rule in INERT_RULES:
        if rule.applies(config):
            continue
        found = _first_difference(_value_at(config, rule.key), _value_at(_DEFAULTS, rule.key), rule.key, rule.switches)
        if found:
            key, value = found
            default = _value_at(_DEFAULTS, key)
            raise ConfigError(
                f"{key}={_shown(value)} has no effect {rule.unless}",
                f"{rule.fix}, or remove {key}; on the command line --set {key}={_shown(default)}",
            )


def _shown(value: Any) -> str:
    """A value as YAML would write it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def natural_task(config: Config) -> str | None:
    """The task a config will run when that is known without reading data (None: a local file or
    hub dataset with data.task auto)."""
    if config.data.task != "auto":
        return config.data.task
    source = BUILTIN_SOURCES.get(config.data.source)
    return source.task if source else None


def check_model(config: Config, task: str | None) -> None:
    """``model.name`` resolves offline, is a causal LM for a generative ``task``, and has at least
    ``model.max_length`` positions."""
    name = config.model.name
    locate.check_model_name(name)
    if task is not None and task != "classification" and locate.model_family(name) == "encoder":
        raise ModelError(
            f"model '{name}' is an encoder and cannot generate text (data.task {task})",
            "use a causal LM such as atoll-edge or tiny-llama for sft, math and completion tasks",
        )
    limit = locate.position_limit(name)
    if limit is not None and config.model.max_length > limit:
        raise ConfigError(
            f"model.max_length={config.model.max_length} exceeds the {limit} positions of model '{name}'",
            f"set model.max_length <= {limit}",
        )
    generated = config.eval.max_new_tokens if task == "math" else 0  # math evaluation generates answers
    if limit is not None and config.model.max_length + generated > limit:
        raise ConfigError(
            f"model.max_length={config.model.max_length} plus eval.max_new_tokens={generated} exceeds the {limit} positions of model '{name}'",
            f"keep their sum <= {limit}",
        )
    if not config.model.random_init:
        locate.check_weights(name)


def check_partition(config: Config, task: str | None) -> None:
    """The natural partition names the column that says whose each example is; label-skew
    partitions need the class labels only classification has."""
    name = config.partition.name
    if name == "natural" and not config.partition.column:
        raise ConfigError(
            "partition.name: natural needs partition.column", "set partition.column to the column that identifies the data owner"
        )
    if name in ("dirichlet", "shards") and task not in (None, "classification") and not config.realistic.dry_run:
        raise ConfigError(
            f"partition.name: {name} splits by class label and the {task} task has none", "use partition.name: iid, quantity or natural"
        )


def _check_held_out(config: Config, examples: int, what: str, error: type[ConfigError] | type[DataError]) -> None:
    """The global test set and the validation set leave examples of ``examples`` to train on."""
    test, validation = config.data.test_size, config.data.validation_size
    held_out = sum(int(size) if size >= 1 else round(size * examples) for size in (test, validation))
    if held_out >= examples:
        sizes = f"data.test_size={test:g}" + (f" and data.validation_size={validation:g} leave" if validation else " leaves")
        raise error(f"{sizes} nothing of {what} for training", "hold out fewer examples: smaller counts or fractions such as 0.1")


def check_counts(config: Config) -> None:
    """Counts that cannot fit each other or the machine: a global test set as large as the
    examples kept, and more torch threads than CPU cores (beyond that a run only slows; far beyond
    it, the thread pool crashes the process)."""
    kept = config.data.max_examples
    if kept is not None:
        _check_held_out(config, kept, f"data.max_examples={kept}", ConfigError)
    cores = os.cpu_count() or 1
    if config.run.threads > cores:
        raise ConfigError(
            f"run.threads={config.run.threads} is more than the {cores} CPU cores of this machine", f"set run.threads <= {cores}"
        )


def check_target(config: Config, task: str | None) -> None:
    """``realistic.target_metric`` names a metric ``task`` reports (any task's when None);
    fractions are reachable."""
    metric, value = config.realistic.target_metric, config.realistic.target_value
    if metric is None:
        return
    if config.realistic.dry_run:
        raise ConfigError(
            "realistic.target_metric: a dry run trains and evaluates nothing, so no target is ever reached", "remove the target"
        )
    known = TASK_METRICS[task] if task else sorted({m for names in TASK_METRICS.values() for m in names})
    if metric not in known:
        where = f"the {task} task" if task else "any task"
        close = difflib.get_close_matches(metric.lower(), known, n=1, cutoff=0.6)
        meant = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"realistic.target_metric '{metric}' is not a metric of {where}{meant}", f"use one of: {', '.join(known)}")
    if metric in FRACTION_METRICS and value is not None and not 0 <= value <= 1:
        raise ConfigError(
            f"realistic.target_value={value} can never be reached: {metric} is a fraction in [0, 1]",
            f"write it as a fraction, e.g. {value / 100:g}" if 1 < value <= 100 else "set a value in [0, 1]",
        )


def check_run_location(config: Config) -> None:
    """The run directory of a new run can be created where ``run.dir`` / ``run.root`` put it
    (not part of :func:`atoll.resolve.resolve`: a resumed run is checked where it is; ``atoll run``
    calls this before torch, and ``dispatch.start_run`` again before any model loads)."""
    from atoll.report.rundir import RunDir

    what = "run directory" if config.run.dir else "run directory under run.root"
    RunDir.check_location(RunDir.choose_path(config), what)


def check_source(config: Config) -> str | None:
    """``data.source`` names a built-in, a hub dataset while the hub is reachable (its contents
    are checked when it is read), or a local file of a known format, which is read here: its
    format, encoding, columns and values are checked before any model is loaded (the run reuses
    the parse). Returns the task the run will have (None: a hub dataset with data.task auto)."""
    if config.realistic.dry_run:  # a dry run reads no data
        return natural_task(config)
    path = local_file(config.data.source)
    if path is None:
        return natural_task(config)
    from atoll.data.tasks import resolve_task

    raw = load_source(config.data.source)
    task = resolve_task(config.data, raw).kind
    column = config.partition.column
    if config.partition.name == "natural" and column not in raw.columns:
        shown = ", ".join(repr(name) for name in raw.columns)
        raise DataError(f"partition.column '{column}' does not exist in {config.data.source}", f"columns are: {shown}")
    examples = min(len(raw), config.data.max_examples or len(raw))
    _check_held_out(config, examples, f"the {examples} examples of {config.data.source}", DataError)
    return task
