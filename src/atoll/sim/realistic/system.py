"""The sys.yaml: devices, networks, availability, ranks and (for dry runs) the workload.

One file describes the composite heterogeneity of a federation:

- ``devices``: named compute profiles (effective training TFLOP/s and memory) drawn by clients in
  given proportions, optionally pinned per client, with a per-client speed spread;
- ``networks``: up/down bandwidth distributions and latency, drawn the same way;
- ``availability``: always on, daily windows or a recorded trace, plus Bernoulli dropout;
- ``ranks``: LoRA rank by device tier or by a memory budget (the resolved run's client ranks,
  so servers and clients see them);
- ``workload``: model size and data sizes for dry runs, which load neither model nor data.

:func:`atoll.resolve.resolve` reads the file and resolves the fleet when a run is resolved: every
problem is a one-line :class:`ConfigError` or :class:`DataError` before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atoll.config import check_scalars
from atoll.errors import ConfigError
from atoll.sim.realistic.draws import Draws
from atoll.textfiles import parse_yaml, read_text

# ---------------------------------------------------------------------------------------------
# built-in profiles (effective sustained training throughput, not peak; assumptions, override them)

BUILTIN_DEVICES: dict[str, dict[str, float]] = {
    "gpu-server": {"tflops": 120.0, "memory_gb": 80.0},
    "laptop": {"tflops": 2.0, "memory_gb": 16.0},
    "flagship-phone": {"tflops": 1.0, "memory_gb": 12.0},
    "budget-phone": {"tflops": 0.08, "memory_gb": 4.0},
    # Jetson TX2 : Nano : Raspberry Pi 4 keep the 1 : 1/1.8125 : 1/11.625 speed ratios measured for
    # LoRA fine-tuning on these boards (FedLLM-Factory's device factors)
    "jetson-tx2": {"tflops": 0.4, "memory_gb": 8.0},
    "jetson-nano": {"tflops": 0.4 / 1.8125, "memory_gb": 4.0},
    "raspberry-pi-4": {"tflops": 0.4 / 11.625, "memory_gb": 4.0},
}

BUILTIN_NETWORKS: dict[str, dict[str, Any]] = {
    "ethernet": {"down_mbps": {"median": 900.0, "sigma": 0.1}, "up_mbps": {"median": 900.0, "sigma": 0.1}, "latency_ms": 2.0},
    "wifi": {"down_mbps": {"median": 60.0, "sigma": 0.6}, "up_mbps": {"median": 20.0, "sigma": 0.6}, "latency_ms": 15.0},
    "4g": {"down_mbps": {"median": 30.0, "sigma": 0.7}, "up_mbps": {"median": 8.0, "sigma": 0.7}, "latency_ms": 60.0},
    "5g": {"down_mbps": {"median": 200.0, "sigma": 0.7}, "up_mbps": {"median": 40.0, "sigma": 0.7}, "latency_ms": 25.0},
}


@dataclass(frozen=True)
class Geometry:
    """What the cost model needs to know about a model: sizes, not weights."""

    base_parameters: int
    lora_parameters_per_rank: int
    extra_parameters: int
    hidden_size: int
    layers: int


# Sizes of the built-in models with ``target_modules: auto`` (measured; the causal ones assume the
# full 2,048 / 4,096 BPE vocabulary). Real runs use the exact counts of the built model instead.
BUILTIN_GEOMETRY: dict[str, Geometry] = {
    "tiny-bert": Geometry(2_057_731, 512, 195, 64, 2),
    "minilm": Geometry(22_714_371, 9_216, 1_155, 384, 6),
    "tiny-llama": Geometry(354_624, 448, 0, 64, 2),
    "tiny-qwen2": Geometry(354_880, 448, 0, 64, 2),
    "small-llama": Geometry(4_999_424, 3_584, 0, 256, 4),
}


# ---------------------------------------------------------------------------------------------
# the sys.yaml schema


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogNormal(_Spec):
    """A positive quantity: ``median * exp(sigma * z)``, z standard normal clipped to [-3, 3]."""

    median: float = Field(gt=0)
    sigma: float = Field(0.0, ge=0)


Quantity = Union[float, LogNormal]


def _as_lognormal(value: float | LogNormal) -> LogNormal:
    return value if isinstance(value, LogNormal) else LogNormal(median=float(value), sigma=0.0)


class DeviceProfile(_Spec):
    tflops: float = Field(gt=0, description="effective training throughput in TFLOP/s")
    memory_gb: float = Field(gt=0, description="memory available to training")


class NetworkProfile(_Spec):
    down_mbps: Quantity = Field(description="download bandwidth in Mbit/s: a number or {median, sigma}")
    up_mbps: Quantity = Field(description="upload bandwidth in Mbit/s: a number or {median, sigma}")
    latency_ms: float = Field(0.0, ge=0, description="added to every transfer")

    @field_validator("down_mbps", "up_mbps")
    @classmethod
    def _positive(cls, value):
        if not isinstance(value, LogNormal) and value <= 0:
            raise ValueError("bandwidth must be > 0")
        return value


class DevicesSpec(_Spec):
    mix: dict[str, float] = Field(description="profile name -> proportion of clients")
    clients: dict[int, str] = Field(default_factory=dict, description="pin client ids to profiles")
    profiles: dict[str, DeviceProfile] = Field(default_factory=dict, description="define or override profiles")
    speed_sigma: float = Field(0.0, ge=0, description="per-client log-normal spread of throughput")


class NetworksSpec(_Spec):
    mix: dict[str, float] = Field(description="profile name -> proportion of clients")
    clients: dict[int, str] = Field(default_factory=dict, description="pin client ids to profiles")
    profiles: dict[str, NetworkProfile] = Field(default_factory=dict, description="define or override profiles")


class DailySpec(_Spec):
    start_hour: float = Field(22.0, ge=0, lt=24, description="clock hour a device's window opens")
    hours: float = Field(8.0, gt=0, lt=24, description="window length")
    jitter_hours: float = Field(0.0, ge=0, description="each day's start moves by a uniform draw in [-jitter, +jitter]")
    presence: float = Field(1.0, gt=0, le=1, description="probability that a client shows up on a given day")
    clock_start_hour: float = Field(0.0, ge=0, lt=24, description="clock hour at virtual time 0")

    @model_validator(mode="after")
    def _no_overlap(self) -> "DailySpec":
        if self.hours + 2 * self.jitter_hours >= 24:
            raise ValueError("daily windows would overlap: hours + 2 * jitter_hours must be < 24")
        return self


class TraceSpec(_Spec):
    path: str = Field(description="CSV with a header client,start,end (seconds); relative to this sys.yaml")
    map: Literal["id", "modulo"] = Field(
        "id", description="id: trace client k is client k; modulo: client c uses the (c mod T)-th trace client"
    )
    offset_seconds: float = Field(0.0, ge=0, description="trace time that virtual time 0 corresponds to")


class DropoutSpec(_Spec):
    probability: float = Field(0.0, ge=0, le=1, description="chance that a job is cut by the device dropping out")
    rejoin_minutes: float = Field(30.0, gt=0, description="a dropped device is back this long later (if its window is still open)")


class AvailabilitySpec(_Spec):
    windows: Literal["always", "daily", "trace"] = Field("always", description="when devices are online")
    daily: DailySpec = Field(default_factory=DailySpec)
    trace: TraceSpec | None = None
    dropout: DropoutSpec = Field(default_factory=DropoutSpec)

    @model_validator(mode="after")
    def _trace_given(self) -> "AvailabilitySpec":
        if self.windows == "trace" and self.trace is None:
            raise ValueError("availability.windows is trace but availability.trace.path is not set")
        return self


class MemoryRanks(_Spec):
    usable_fraction: float = Field(0.5, gt=0, le=1, description="share of device memory training may use")
    choices: list[int] = Field(default_factory=lambda: [2, 4, 8, 16, 32, 64], description="ranks to choose from")

    @field_validator("choices")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(r <= 0 for r in value):
            raise ValueError("choices must be a non-empty list of positive ranks")
        return sorted(set(value))


class RanksSpec(_Spec):
    by: Literal["none", "device", "memory"] = Field("none", description="how client LoRA ranks are set")
    device: dict[str, int] = Field(default_factory=dict, description="profile name -> rank (by: device)")
    memory: MemoryRanks = Field(default_factory=MemoryRanks)


class WorkloadSpec(_Spec):
    """Dry runs only: what the clients would train, without loading data or model."""

    examples: Quantity = Field(200.0, description="training examples per client: a number or {median, sigma}")
    tokens_per_example: float = Field(64.0, gt=0, description="mean tokens of one example")
    model_parameters: int | None = Field(None, gt=0, description="frozen base parameters (default: the built-in model's)")
    lora_parameters_per_rank: int | None = Field(None, ge=0, description="LoRA parameters per unit of rank")
    extra_parameters: int | None = Field(None, ge=0, description="other trained parameters (a classifier head)")
    hidden_size: int | None = Field(None, gt=0, description="for activation memory (ranks by memory)")
    layers: int | None = Field(None, gt=0, description="for activation memory (ranks by memory)")


class ServerSpec(_Spec):
    device: str = Field("gpu-server", description="profile of the server (runs the centralized baseline's pooled client)")


class SystemSpec(_Spec):
    devices: DevicesSpec
    networks: NetworksSpec
    availability: AvailabilitySpec = Field(default_factory=AvailabilitySpec)
    ranks: RanksSpec = Field(default_factory=RanksSpec)
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    server: ServerSpec = Field(default_factory=ServerSpec)
    description: str = ""


# ---------------------------------------------------------------------------------------------
# loading


def _describe(error: ValidationError, source: str) -> ConfigError:
    errors = error.errors()
    # a misspelt key also makes the right one "missing": name the misspelling first
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [str(p) for p in first["loc"] if not str(p).startswith(("function-", "union["))]
    # drop pydantic's union branch names ("float", "LogNormal") from the path
    loc = [p for p in loc if p not in ("float", "LogNormal", "int", "str")]
    key = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        return ConfigError(f"system file '{source}': unknown key '{key}'", "see docs/realistic-mode.md for the keys of a sys.yaml")
    if first["type"] == "missing":
        return ConfigError(f"system file '{source}': '{key}' is required", "see configs/sys/ for complete examples")
    message = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return ConfigError(f"system file '{source}': {key}: {message}{shown}")


_CACHE: dict[tuple, SystemSpec] = {}


def read_system(path: str | Path) -> SystemSpec:
    """Parse and validate a sys.yaml (cached by path, size and modification time)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"system file '{path}' does not exist", "give a sys.yaml path, e.g. --set system=configs/sys/phones.yaml")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    tree = parse_yaml(read_text(path, ConfigError, "system file"), path, ConfigError, "system file")
    if not isinstance(tree, dict):
        raise ConfigError(f"system file '{path}' must hold a mapping with devices and networks", "see configs/sys/phones.yaml")
    check_scalars(SystemSpec, tree, where=f"system file '{path}': ")
    try:
        spec = SystemSpec.model_validate(tree)
    except ValidationError as exc:
        raise _describe(exc, str(path)) from None
    _check_names(spec, str(path))
    _CACHE[key] = spec
    return spec


def device_profiles(spec: SystemSpec) -> dict[str, DeviceProfile]:
    profiles = {name: DeviceProfile(**values) for name, values in BUILTIN_DEVICES.items()}
    profiles.update(spec.devices.profiles)
    return profiles


def network_profiles(spec: SystemSpec) -> dict[str, NetworkProfile]:
    profiles = {name: NetworkProfile.model_validate(values) for name, values in BUILTIN_NETWORKS.items()}
    profiles.update(spec.networks.profiles)
    return profiles


def _check_mix(kind: str, mix: dict[str, float], pinned: dict[int, str], known: dict[str, Any], source: str) -> None:
    for name in list(mix) + list(pinned.values()):
        if name not in known:
            raise ConfigError(
                f"system file '{source}': unknown {kind} profile '{name}'",
                f"use one of {', '.join(sorted(known))} or define it under {kind}s.profiles",
            )
    if not mix or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ConfigError(
            f"system file '{source}': {kind}s.mix needs non-negative proportions with a positive sum", "e.g. mix: {wifi: 0.7, 4g: 0.3}"
        )


def _check_names(spec: SystemSpec, source: str) -> None:
    devices = device_profiles(spec)
    _check_mix("device", spec.devices.mix, spec.devices.clients, devices, source)
    _check_mix("network", spec.networks.mix, spec.networks.clients, network_profiles(spec), source)
    if spec.server.device not in devices:
        raise ConfigError(
            f"system file '{source}': unknown device profile '{spec.server.device}' for server.device",
            f"use one of {', '.join(sorted(devices))}",
        )
    if spec.ranks.by == "device":
        used = set(spec.devices.mix) | set(spec.devices.clients.values())
        missing = sorted(name for name in used if name not in spec.ranks.device)
        if missing:
            raise ConfigError(
                f"system file '{source}': ranks.device has no rank for device profile(s) {', '.join(missing)}",
                "add them, e.g. ranks.device: {budget-phone: 4}",
            )
        bad = {name: rank for name, rank in spec.ranks.device.items() if rank <= 0}
        if bad:
            raise ConfigError(f"system file '{source}': ranks.device must be positive, got {bad}")


def trace_path(spec: SystemSpec, system_path: str | Path) -> Path | None:
    if spec.availability.windows != "trace" or spec.availability.trace is None:
        return None
    raw = Path(spec.availability.trace.path).expanduser()
    return raw if raw.is_absolute() else Path(system_path).resolve().parent / raw


# ---------------------------------------------------------------------------------------------
# resolution: which client has which device, network, speed and rank


@dataclass
class Fleet:
    """Per-client profile indices and factors (arrays over client ids)."""

    device_names: list[str]
    network_names: list[str]
    device: np.ndarray  # int index into device_names
    network: np.ndarray  # int index into network_names
    speed: np.ndarray  # float multiplier of the profile throughput
    ranks: np.ndarray | None  # int LoRA rank per client (None: the config's ranks)


def _assign(draws: Draws, purpose: str, clients: int, mix: dict[str, float], pinned: dict[int, str]) -> tuple[list[str], np.ndarray]:
    names = sorted(set(mix) | set(pinned.values()))
    weights = np.array([mix.get(name, 0.0) for name in names], dtype=np.float64)
    cumulative = np.cumsum(weights / weights.sum())
    cumulative[-1] = 1.0
    u = draws.uniforms(purpose, np.arange(clients))
    index = np.searchsorted(cumulative, u, side="right").astype(np.int64)
    index = np.minimum(index, len(names) - 1)
    for client_id, name in pinned.items():
        if 0 <= client_id < clients:
            index[client_id] = names.index(name)
    return names, index


def geometry_for(config, spec: SystemSpec) -> Geometry | None:
    """Model sizes for dry runs and memory ranks: the sys.yaml workload, else the built-in table."""
    work = spec.workload
    known = BUILTIN_GEOMETRY.get(config.model.name) if config.model.lora.target_modules == "auto" else None
    base = work.model_parameters if work.model_parameters is not None else (known.base_parameters if known else None)
    per_rank = (
        work.lora_parameters_per_rank if work.lora_parameters_per_rank is not None else (known.lora_parameters_per_rank if known else None)
    )
    if base is None or per_rank is None:
        return None
    extra = work.extra_parameters if work.extra_parameters is not None else (known.extra_parameters if known else 0)
    hidden = work.hidden_size or (known.hidden_size if known else 0)
    layers = work.layers or (known.layers if known else 0)
    return Geometry(int(base), int(per_rank), int(extra), int(hidden), int(layers))


def dtype_bytes(config) -> int:
    return 2 if config.model.dtype == "bfloat16" else 4


def memory_rank(memory_gb: float, geometry: Geometry, config, ranks: MemoryRanks) -> int | None:
    """Largest rank whose training footprint fits the device's usable memory: frozen weights, +16
    bytes per trained parameter (fp32 weight, gradient, two Adam moments), + activations
    (34 bytes per token per hidden unit per layer, Korthikanti et al. 2022, scaled to the dtype)."""
    width = dtype_bytes(config)
    tokens = config.train.batch_size * config.model.max_length
    fixed = geometry.base_parameters * width + 16 * geometry.extra_parameters
    fixed += 34 * tokens * geometry.hidden_size * geometry.layers * width / 2
    budget = ranks.usable_fraction * memory_gb * 2**30
    fitting = [r for r in ranks.choices if fixed + 16 * geometry.lora_parameters_per_rank * r <= budget]
    return max(fitting) if fitting else None


def resolve_fleet(config, spec: SystemSpec, source: str = "sys.yaml") -> Fleet:
    """Assign profiles, speeds and ranks to ``config.federation.clients`` clients from the seed."""
    clients = config.federation.clients
    draws = Draws(config.seed)
    device_names, device = _assign(draws, "device-profile", clients, spec.devices.mix, spec.devices.clients)
    network_names, network = _assign(draws, "network-profile", clients, spec.networks.mix, spec.networks.clients)
    speed = np.ones(clients)
    if spec.devices.speed_sigma > 0:
        z = np.clip(draws.normals("device-speed", np.arange(clients)), -3.0, 3.0)
        speed = np.exp(spec.devices.speed_sigma * z)
    ranks = None
    if spec.ranks.by == "device":
        table = np.array([spec.ranks.device[name] for name in device_names], dtype=np.int64)
        ranks = table[device]
    elif spec.ranks.by == "memory":
        geometry = geometry_for(config, spec)
        if geometry is None:
            raise ConfigError(
                f"system file '{source}': ranks by memory need the size of model '{config.model.name}'",
                "set workload.model_parameters and workload.lora_parameters_per_rank (and hidden_size, layers)",
            )
        profiles = device_profiles(spec)
        table = []
        for name in device_names:
            rank = memory_rank(profiles[name].memory_gb, geometry, config, spec.ranks.memory)
            if rank is None:
                raise ConfigError(
                    f"system file '{source}': device profile '{name}' ({profiles[name].memory_gb:g} GB) cannot hold "
                    f"model '{config.model.name}' with the smallest rank {spec.ranks.memory.choices[0]}",
                    "raise ranks.memory.usable_fraction, lower train.batch_size or model.max_length, or drop the profile",
                )
            table.append(rank)
        ranks = np.array(table, dtype=np.int64)[device]
    return Fleet(device_names, network_names, device, network, speed, ranks)


def system_source(config) -> Path:
    return Path(config.system).expanduser()


def load_for_run(config) -> tuple[SystemSpec, Fleet]:
    path = system_source(config)
    spec = read_system(path)
    return spec, resolve_fleet(config, spec, str(path))


def describe_spec(spec: SystemSpec) -> str:
    """The resolved sys.yaml (defaults filled in), for the run directory."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


__all__ = [
    "BUILTIN_DEVICES",
    "BUILTIN_NETWORKS",
    "BUILTIN_GEOMETRY",
    "Geometry",
    "SystemSpec",
    "Fleet",
    "read_system",
    "resolve_fleet",
    "geometry_for",
    "memory_rank",
    "load_for_run",
    "device_profiles",
    "network_profiles",
    "dtype_bytes",
    "trace_path",
    "describe_spec",
]
