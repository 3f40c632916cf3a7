"""The security benchmark's matrix: per task a base config, the protections (rows) and the attacks
(columns), each a set of config overrides; a cell is one run of protection + attack.

A matrix is a YAML file (``configs/bench/security.yaml``); base configs are named relative to it.
Pydantic and yaml only: a bad matrix is a one-line error before torch is imported. A cell the run
config refuses (e.g. Krum under secure aggregation) is kept, with the refusal as its result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from atoll.errors import AtollError, ConfigError

Overrides = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SecurityTask(_Strict):
    """One task of the matrix: a base config made smaller by ``set``, and its rows and columns."""

    title: str = Field(description="one line saying what the task is (model, data, clients, rounds)")
    config: str = Field(description="base config of every run, relative to the matrix file")
    set: Overrides = Field(default_factory=dict, description="overrides of every run of this task (config key -> value)")
    protections: dict[str, Overrides] = Field(min_length=1, description="protection name -> its overrides (the table's rows)")
    attacks: dict[str, Overrides] = Field(min_length=1, description="attack name -> its overrides (the table's columns)")
    cell_set: dict[str, Overrides] = Field(
        default_factory=dict, description="'protection x attack' (either may be '*') -> overrides of those cells only"
    )


class SecurityMatrix(_Strict):
    tasks: dict[str, SecurityTask] = Field(min_length=1)


@dataclass(frozen=True)
class Cell:
    """One run of the matrix: task, protection, attack, and every override that makes it."""

    task: str
    protection: str
    attack: str
    config: str
    overrides: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.task}/{self.protection}--{self.attack}"

    def directory(self, runs: Path) -> Path:
        return runs / self.task / f"{self.protection}--{self.attack}"


def assignments(values: Overrides) -> list[str]:
    """``key=value`` overrides; non-strings are written as JSON (which the config parser reads as YAML)."""
    return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in values.items()]


def load_matrix(path: Path) -> SecurityMatrix:
    """The matrix in ``path``, with each task's config resolved against the file's folder."""
    if not path.is_file():
        raise ConfigError(f"security matrix '{path}' does not exist", "pass an existing YAML file, e.g. configs/bench/security.yaml")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
        matrix = SecurityMatrix.model_validate(tree)
    except yaml.YAMLError as error:
        raise ConfigError(f"security matrix '{path}' is not valid YAML ({str(error).splitlines()[0]})", "fix the file") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"security matrix '{path}': {where}: {first['msg']}", "see configs/bench/security.yaml") from None
    for task in matrix.tasks.values():
        config = Path(task.config)
        task.config = str(config if config.is_absolute() else path.parent / config)
        if not Path(task.config).is_file():
            raise ConfigError(f"security matrix '{path}': base config '{task.config}' does not exist", "fix the task's config path")
        for pair in task.cell_set:
            protection, _, attack = (part.strip() for part in pair.partition("x"))
            if protection not in {*task.protections, "*"} or attack not in {*task.attacks, "*"}:
                raise ConfigError(f"security matrix '{path}': cell_set '{pair}' names no cell", "write 'protection x attack'")
    return matrix


def cells(matrix: SecurityMatrix, tasks: list[str] | None = None) -> list[Cell]:
    """Every cell of the chosen tasks (all by default), rows first."""
    chosen = tasks or list(matrix.tasks)
    unknown = [t for t in chosen if t not in matrix.tasks]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}", f"choose from {', '.join(matrix.tasks)}")
    result = []
    for name in chosen:
        task = matrix.tasks[name]
        for protection, protection_set in task.protections.items():
            for attack, attack_set in task.attacks.items():
                extra: Overrides = {}
                for pair, values in task.cell_set.items():
                    p, _, a = (part.strip() for part in pair.partition("x"))
                    if p in (protection, "*") and a in (attack, "*"):
                        extra.update(values)
                overrides = assignments({**task.set, **protection_set, **attack_set, **extra})
                result.append(Cell(name, protection, attack, task.config, tuple(overrides)))
    return result


def refusal(cell: Cell) -> str | None:
    """Why the run config refuses ``cell`` (one line), or None when it would run. No torch."""
    from atoll.config import load_config
    from atoll.resolve import check

    try:
        check(load_config(cell.config, list(cell.overrides)))
    except AtollError as error:
        return error.message.splitlines()[0]
    return None
