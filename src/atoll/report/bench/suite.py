"""The benchmark suite: which tasks, partitions, algorithms and seeds the comparison runs, how the
algorithms group into learning-rate families, and the learning rates the sweep chose.

A suite is a YAML file (``configs/bench/suite.yaml``); its base configs and its learning-rate file
are named relative to it. Pydantic and yaml only: a bad suite is a one-line error before torch
is imported.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from atoll.errors import ConfigError

LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Task(_Strict):
    """One task of the comparison: a base config, its partitions, the algorithms and the metric."""

    title: str = Field(description="one line saying what the task is (model, data, clients)")
    config: str = Field(description="base config of every run, relative to the suite file")
    metric: str = Field(description="the table's metric (accuracy, perplexity, loss, token_accuracy, ...)")
    also: list[str] = Field(default_factory=list, description="more metrics shown next to it (no paired difference)")
    partitions: dict[str, list[str]] = Field(description="partition name -> config overrides that make it")
    algorithms: list[str] | Literal["all"] = Field("all", description="algorithms compared (all: every registered one)")
    target: float = Field(description="rounds and megabytes to reach this value of the metric are reported")
    learning_rates: list[float] | None = Field(
        None, min_length=1, description="the sweep's grid on this task (default: the suite's sweep.learning_rates)"
    )
    reference: str = Field("fedit", description="paired differences are taken against this algorithm")
    overrides: dict[str, list[str]] = Field(
        default_factory=dict, description="algorithm -> config overrides of its runs only (printed with the table)"
    )
    notes: list[str] = Field(default_factory=list, description="paragraphs printed under the task's heading (what the numbers cannot say)")

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER


class Family(_Strict):
    """Algorithms whose client learning rate is chosen together, on one representative's runs."""

    representative: str
    members: list[str]


class Sweep(_Strict):
    learning_rates: list[float] = Field(min_length=1, description="peak client learning rates tried per family (a task may set its own)")
    seed: int = Field(0, description="seed of the sweep's runs")


class Suite(_Strict):
    seeds: int = Field(3, gt=0, description="seeds 0..N-1 per cell")
    learning_rates: str = Field("learning-rates.yaml", description="the sweep's result, relative to the suite file")
    families: dict[str, Family]
    sweep: Sweep
    tasks: dict[str, Task] = Field(min_length=1)
    path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _families_partition_algorithms(self) -> "Suite":
        seen: dict[str, str] = {}
        for name, family in self.families.items():
            if family.representative not in family.members:
                raise ValueError(f"family '{name}': its representative '{family.representative}' is not one of its members")
            for member in family.members:
                if member in seen:
                    raise ValueError(f"'{member}' is in two families ({seen[member]} and {name})")
                seen[member] = name
        return self

    # -- what a suite implies --------------------------------------------------------------------------
    def algorithms(self, task: str) -> list[str]:
        chosen = self.tasks[task].algorithms
        if chosen == "all":
            from atoll.algorithms.catalog import SPECS

            return sorted(SPECS)
        return list(chosen)

    def family_of(self, algorithm: str) -> str:
        for name, family in self.families.items():
            if algorithm in family.members:
                return name
        raise ConfigError(f"algorithm '{algorithm}' belongs to no family of the suite", "add it to a family's members")

    def families_of(self, task: str) -> list[str]:
        """The families a task's algorithms belong to, in suite order."""
        used = {self.family_of(a) for a in self.algorithms(task)}
        return [name for name in self.families if name in used]

    def grid(self, task: str) -> list[float]:
        """The peak learning rates the sweep tries on a task."""
        return list(self.tasks[task].learning_rates or self.sweep.learning_rates)

    def config_path(self, task: str) -> Path:
        return self._relative(self.tasks[task].config)

    def learning_rate_path(self) -> Path:
        return self._relative(self.learning_rates)

    def _relative(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() or self.path is None else self.path.parent / path

    def check(self) -> None:
        """Every algorithm exists and has a family; every base config exists."""
        from atoll.algorithms.catalog import SPECS

        for task in self.tasks:
            for algorithm in self.algorithms(task):
                if algorithm not in SPECS:
                    raise ConfigError(f"task '{task}': unknown algorithm '{algorithm}'", f"choose from: {', '.join(sorted(SPECS))}")
                self.family_of(algorithm)
            for algorithm in self.tasks[task].overrides:
                if algorithm not in self.algorithms(task):
                    raise ConfigError(
                        f"task '{task}': overrides name '{algorithm}', which the task does not run", "remove it or add the algorithm"
                    )
            if not self.config_path(task).is_file():
                raise ConfigError(f"task '{task}': base config '{self.config_path(task)}' does not exist", "fix the suite's config path")
        for name, family in self.families.items():
            for member in family.members:
                if member not in SPECS:
                    raise ConfigError(f"family '{name}': unknown algorithm '{member}'", f"choose from: {', '.join(sorted(SPECS))}")


def load_suite(path: Path) -> Suite:
    """Read and check a suite file (one-line :class:`ConfigError` on anything wrong)."""
    if not path.is_file():
        raise ConfigError(f"suite file '{path}' does not exist", "pass a suite such as configs/bench/suite.yaml")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"'{path}' is not valid YAML", "fix the syntax") from None
    try:
        suite = Suite.model_validate(tree)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "suite"
        raise ConfigError(f"{path}: {where}: {first['msg'].removeprefix('Value error, ')}") from None
    suite.path = path
    suite.check()
    return suite


# -- the learning rates the sweep chose -------------------------------------------------------------


def read_learning_rates(suite: Suite) -> dict:
    """The sweep's file: {"chosen": {task: {family: lr}}, "scores": ..., "made": ...} (empty if absent)."""
    path = suite.learning_rate_path()
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def learning_rate(suite: Suite, chosen: dict, task: str, algorithm: str) -> float:
    """The peak client learning rate the sweep chose for ``algorithm``'s family on ``task``."""
    family = suite.family_of(algorithm)
    try:
        return float(chosen["chosen"][task][family])
    except (KeyError, TypeError):
        raise ConfigError(
            f"no learning rate for family '{family}' on task '{task}' in {suite.learning_rate_path()}",
            "run `atoll bench sweep` first",
        ) from None


def write_learning_rates(suite: Suite, chosen: dict, scores: dict, command: str) -> Path:
    """Write the sweep's choice and every score it was chosen from."""
    path = suite.learning_rate_path()
    header = (
        f"# Written by `{command}` on {datetime.date.today().isoformat()}.\n"
        "# chosen: the peak client learning rate per task and family, the best mean validation metric over the\n"
        "# task's partitions (one run per cell, seed below); scores: that validation metric per learning rate.\n"
    )
    body = {"chosen": chosen, "scores": scores, "seed": suite.sweep.seed}
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))
    return path
