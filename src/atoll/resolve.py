"""One resolve step: a config becomes a resolved run, checked once, before anything is loaded.

:func:`resolve` looks up the chosen algorithm's declaration (without importing its module),
validates its parameters, runs the one compatibility check (:mod:`atoll.compat`), reads the
realistic-mode system file and its trace, assigns every client its device, network and LoRA
rank (in prototype mode a sys.yaml sets the ranks only: the same ranks as realistic mode for the
same file and seed), and checks the Flower settings. The result, a :class:`ResolvedRun`, is what every driver
runs and what the run directory records (``config.yaml`` and ``resolved.json``, written once by :meth:`atoll.report.rundir.RunDir.create`); the
Flower ServerApp and ClientApps receive it as it is and check nothing again.

The user's config object is never changed: the run's effective config (the ranks a sys.yaml
assigns, absolute paths, a DP noise multiplier solved from a target epsilon) is a resolved copy.
Nothing here imports torch (except that solving, through opacus), so a config error appears in a
fraction of a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atoll import compat, input_checks
from atoll.algorithms import parse_params, spec_of
from atoll.config import Config, build_config, check_scalars
from atoll.errors import ConfigError
from atoll.fl.capabilities import AlgorithmSpec
from atoll.fl.stages import check_behaviours
from atoll.privacy.checks import check_protections, effective_settings


@dataclass
class ResolvedRun:
    """A config with everything decided: the effective config, each client's LoRA rank, the
    algorithm's declaration and, in realistic mode, the system file and the fleet."""

    config: Config
    client_ranks: list[int]
    spec: AlgorithmSpec
    system_path: str | None = None
    system: Any = None  # the parsed SystemSpec (realistic mode)
    fleet: Any = None  # the resolved Fleet (realistic mode): device, network, speed, rank per client
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def default_rank(self) -> int:
        """The rank of the federation's live adapter: ``model.lora.rank`` of the effective config."""
        return self.config.model.lora.rank

    def rank_set(self) -> set[int]:
        return set(self.client_ranks)

    # -- what the run directory and Flower processes receive ----------------------------------------
    def to_json(self) -> str:
        ranks = sorted(self.rank_set())
        payload = {
            "config": self.config.model_dump(mode="json"),
            "algorithm": self.spec.name,
            "client_ranks": ranks[0] if len(ranks) == 1 else self.client_ranks,
            "system_path": self.system_path,
            "system": self.system.model_dump(mode="json") if self.system is not None else None,
        }
        return json.dumps(payload, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ResolvedRun":
        """The resolved run as written by :meth:`to_json` (schema-validated, nothing re-checked)."""
        payload = json.loads(text)
        config = build_config(payload["config"])
        ranks = payload["client_ranks"]
        if isinstance(ranks, int):
            ranks = [ranks] * config.federation.clients
        system = None
        if payload.get("system") is not None:
            from atoll.sim.realistic.system import SystemSpec

            system = SystemSpec.model_validate(payload["system"])
        return cls(config, [int(r) for r in ranks], spec_of(config.algorithm.name), payload.get("system_path"), system)


def resolve(config: Config) -> ResolvedRun:
    """Check ``config`` against its algorithm, system file and engine; return the resolved run."""
    if isinstance(config, ResolvedRun):
        return config
    spec = spec_of(config.algorithm.name)
    check_scalars(spec.Params, config.algorithm.params(), "algorithm.")
    parse_params(spec, config.algorithm.params())
    if config.mode != "realistic" and config.realistic.dry_run:
        raise ConfigError("realistic.dry_run needs mode: realistic", "add --set mode=realistic (or use `atoll run --dry-run`)")
    input_checks.check_inert_keys(config)
    input_checks.check_counts(config)
    task = input_checks.check_source(config)
    input_checks.check_target(config, task)
    if not config.realistic.dry_run:  # a dry run loads no model
        input_checks.check_model(config, task)
    input_checks.check_partition(config, task)
    ranks = [config.rank_of(c) for c in range(config.federation.clients)]
    compat.check_ranks(spec, set(ranks))
    compat.check_personal_export(config, spec)
    check_behaviours(config)
    compat.check_stages(config, spec)
    effective = config
    system_path = system = fleet = None
    if config.mode == "realistic":
        effective, ranks, system_path, system, fleet = _resolve_realistic(config, spec, ranks)
    elif config.system:
        effective, ranks, system_path, system, fleet = _resolve_system_ranks(config, spec)
    compat.check_paradigm(effective, spec, set(ranks))
    check_protections(effective, spec, set(ranks))
    effective = effective_settings(effective)  # privacy.dp's noise multiplier, and Flower's DP / SecAgg+ settings
    from atoll.engines.flower.checks import check_flower_settings

    check_flower_settings(effective)
    compat.check_engine(effective, spec)
    return ResolvedRun(effective, ranks, spec, system_path, system, fleet)


def _resolve_realistic(config: Config, spec: AlgorithmSpec, ranks: list[int]):
    """Read the sys.yaml (and its trace), assign the fleet, and derive the ranks it sets."""
    from atoll.sim.realistic.availability import read_trace
    from atoll.sim.realistic.system import geometry_for, read_system, resolve_fleet, trace_path

    settings = config.realistic
    if not config.system:
        raise ConfigError("mode: realistic needs a system file describing the devices", "add --set system=configs/sys/phones.yaml")
    path = Path(config.system).expanduser()
    system = read_system(path)
    trace = trace_path(system, path)
    if trace is not None:
        read_trace(trace)  # a DataError names the bad row
    compat.check_paradigm(config, spec, set())  # an async paradigm needs an async rule, whatever the ranks
    if settings.paradigm == "fedbuff" and settings.fedbuff.buffer > config.federation.clients:
        raise ConfigError(
            f"realistic.fedbuff.buffer={settings.fedbuff.buffer} exceeds the {config.federation.clients} clients "
            "(each client sends at most one update per server version)",
            "lower realistic.fedbuff.buffer",
        )
    if settings.dry_run and geometry_for(config, system) is None:
        raise ConfigError(
            f"a dry run of model '{config.model.name}' needs its size",
            f"set workload.model_parameters and workload.lora_parameters_per_rank in {path}",
        )
    fleet = resolve_fleet(config, system, str(path))
    effective, fleet_ranks = _apply_fleet_ranks(config, spec, path, system, fleet)
    return effective, fleet_ranks or ranks, str(path.resolve()), system, fleet


def _resolve_system_ranks(config: Config, spec: AlgorithmSpec):
    """Prototype mode with a sys.yaml: only its ranks apply (by device tier or memory budget, the
    devices drawn from the seed exactly as realistic mode draws them); its networks, availability
    and trace do not (synchronous rounds have no clock). A file that sets no ranks is refused."""
    from atoll.sim.realistic.system import read_system, resolve_fleet

    path = Path(config.system).expanduser()
    system = read_system(path)
    if system.ranks.by == "none":
        raise ConfigError(
            f"system={config.system} has no effect in prototype mode: {path} sets no ranks (ranks.by: none), "
            "and only a sys.yaml's ranks apply outside realistic mode",
            "set mode: realistic to simulate its devices, give it ranks.by: device or memory, or remove system",
        )
    fleet = resolve_fleet(config, system, str(path))
    effective, ranks = _apply_fleet_ranks(config, spec, path, system, fleet)
    return effective, ranks, str(path.resolve()), system, fleet


def _apply_fleet_ranks(config: Config, spec: AlgorithmSpec, path: Path, system, fleet) -> tuple[Config, list[int] | None]:
    """The effective config with the ranks the fleet assigns written into ``model.lora`` (None: the
    sys.yaml assigns none), after refusing rank settings that conflict with them."""
    settings = config.realistic
    effective = config.model_copy(deep=True)
    effective.system = str(path.resolve())
    ranks = None
    other = "set ranks.by: none in the sys.yaml" if config.mode == "realistic" else "remove system"
    if fleet.ranks is not None:
        if config.model.lora.rank_cycle:
            raise ConfigError(
                f"model.lora.rank_cycle conflicts with the ranks {path} assigns (ranks.by: {system.ranks.by})",
                f"remove model.lora.rank_cycle or {other}",
            )
        given = config.model.lora.client_ranks
        fleet_ranks = [int(rank) for rank in fleet.ranks]
        if settings.dry_run:
            # a dry run builds no server: the ranks stay in the fleet, the algorithm's rule still applies
            if given:
                raise ConfigError("model.lora.client_ranks conflicts with the ranks the sys.yaml assigns", "remove one of them")
            compat.check_ranks(spec, set(fleet_ranks), "use ranks.by: none in the sys.yaml or an algorithm with heterogeneous-rank support")
        else:
            default = config.model.lora.rank
            derived = {client_id: rank for client_id, rank in enumerate(fleet_ranks) if rank != default}
            if given is not None and {c: r for c, r in given.items() if r != default} != derived:
                raise ConfigError(
                    f"model.lora.client_ranks conflicts with the ranks {path} assigns (ranks.by: {system.ranks.by})",
                    f"remove model.lora.client_ranks or {other}",
                )
            distinct = set(fleet_ranks)
            if given is None and len(distinct) == 1:
                effective.model.lora.rank = distinct.pop()  # every device gets the same rank: the federation's rank
                derived = {}
            effective.model.lora.client_ranks = derived or None
            compat.check_ranks(spec, set(fleet_ranks))
        ranks = fleet_ranks
    return effective, ranks


def check(config: Config) -> Config:
    """``config`` after every check of :func:`resolve` (for callers that keep the config only)."""
    resolve(config)
    return config
