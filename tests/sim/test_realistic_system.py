"""The sys.yaml and trace files: validation with one-line errors, profile assignment, ranks by
device tier and by memory budget, deterministic draws, the cost model's geometry."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from atoll import algorithms
from atoll.cli import app
from atoll.config import config_with, load_config
from atoll.resolve import check, resolve
from atoll.errors import ConfigError, DataError
from atoll.sim.realistic.availability import DailyWindows, TraceWindows, generate_trace, read_trace, write_trace
from atoll.sim.realistic.draws import Draws
from atoll.sim.realistic.system import (
    BUILTIN_GEOMETRY,
    DailySpec,
    MemoryRanks,
    Geometry,
    memory_rank,
    read_system,
    resolve_fleet,
)
from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
SYSTEMS = REPO / "configs" / "sys"

GOOD = {
    "devices": {"mix": {"laptop": 1, "budget-phone": 3}},
    "networks": {"mix": {"wifi": 1}},
}


def write(tmp_path, tree, name="sys.yaml") -> Path:
    path = tmp_path / name
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree))
    return path


def realistic(tmp_path, system: Path, **extra) -> list[str]:
    return tiny_overrides(tmp_path / "runs", **{"mode": "realistic", "system": str(system), **extra})


@pytest.mark.parametrize(
    "tree, fragment",
    [
        ("devices: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        ({"networks": {"mix": {"wifi": 1}}}, "'devices' is required"),
        ({**GOOD, "devices": {"mixx": {"laptop": 1}}}, "unknown key 'devices.mixx'"),
        ({**GOOD, "devices": {"mix": {"iphone-99": 1}}}, "unknown device profile 'iphone-99'"),
        ({**GOOD, "networks": {"mix": {"carrier-pigeon": 1}}}, "unknown network profile 'carrier-pigeon'"),
        ({**GOOD, "devices": {"mix": {"laptop": -1}}}, "non-negative proportions"),
        (
            {**GOOD, "devices": {"mix": {"laptop": 1}, "profiles": {"laptop": {"tflops": 0, "memory_gb": 4}}}},
            "devices.profiles.laptop.tflops",
        ),
        ({**GOOD, "networks": {"mix": {"x": 1}, "profiles": {"x": {"down_mbps": -3, "up_mbps": 1}}}}, "bandwidth must be > 0"),
        ({**GOOD, "availability": {"windows": "daily", "daily": {"hours": 20, "jitter_hours": 3}}}, "daily windows would overlap"),
        ({**GOOD, "availability": {"windows": "trace"}}, "availability.trace.path is not set"),
        ({**GOOD, "availability": {"windows": "trace", "trace": {"path": "missing.csv"}}}, "trace file"),
        ({**GOOD, "availability": {"dropout": {"probability": 1.5}}}, "availability.dropout.probability"),
        ({**GOOD, "ranks": {"by": "device", "device": {"laptop": 8}}}, "no rank for device profile(s) budget-phone"),
        ({**GOOD, "ranks": {"by": "bandwidth"}}, "ranks.by"),
        ({**GOOD, "server": {"device": "mainframe"}}, "unknown device profile 'mainframe'"),
    ],
)
def test_a_bad_sys_yaml_is_one_clear_line(tmp_path, tree, fragment):
    path = write(tmp_path, tree)
    with pytest.raises((ConfigError, DataError)) as error:
        check(config_with(realistic(tmp_path, path)))
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "is empty"),
        ("who,from,to\n0,1,2\n", "line 1: the header must be client,start,end"),
        ("client,start,end\n", "has a header but no windows"),
        ("client,start,end\n0,0,10\n1,5\n", "line 3: expected 3 columns"),
        ("client,start,end\n0,zero,10\n", "line 2: '0,zero,10' is not an integer client and two numbers"),
        ("client,start,end\n-1,0,10\n", "line 2: client id -1 is negative"),
        ("client,start,end\n0,10,10\n", "line 2: window 10..10 needs 0 <= start < end"),
        ("client,start,end\n0,0,nan\n", "needs 0 <= start < end"),
        ("client,start,end\n0,0,100\n0,50,150\n", "overlap"),
    ],
)
def test_bad_trace_rows_are_named(tmp_path, text, fragment):
    path = write(tmp_path, text, "trace.csv")
    with pytest.raises(DataError) as error:
        read_trace(path)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_a_bad_trace_is_refused_when_the_config_is_loaded(tmp_path):
    write(tmp_path, "client,start,end\n0,5,1\n", "trace.csv")
    path = write(tmp_path, {**GOOD, "availability": {"windows": "trace", "trace": {"path": "trace.csv"}}})
    with pytest.raises(DataError, match="line 2"):
        check(config_with(realistic(tmp_path, path)))


def test_the_shipped_trace_and_generated_traces_parse(tmp_path):
    windows = read_trace(REPO / "configs" / "traces" / "example.csv")
    assert len(windows) == 20 and all(s < e for rows in windows.values() for s, e in rows)
    path = tmp_path / "generated.csv"
    with open(path, "w") as handle:
        write_trace(generate_trace(7, 3, seed=5), handle, "a comment line")
    again = read_trace(path)
    assert set(again) <= set(range(7)) and again == read_trace(path)


@pytest.mark.parametrize("name", sorted(p.name for p in SYSTEMS.glob("*.yaml")))
def test_every_shipped_sys_yaml_is_valid(name):
    spec = read_system(SYSTEMS / name)
    assert spec.devices.mix and spec.networks.mix


def test_config_level_mistakes_are_refused(tmp_path):
    good = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match="needs a system file"):
        check(config_with(tiny_overrides(tmp_path, **{"mode": "realistic"})))
    with pytest.raises(ConfigError, match="realistic.dry_run needs mode: realistic"):
        check(config_with(tiny_overrides(tmp_path, **{"realistic.dry_run": "true"})))
    with pytest.raises(ConfigError, match="system file '.*nope.yaml' does not exist"):
        check(config_with(realistic(tmp_path, tmp_path / "nope.yaml")))
    with pytest.raises(ConfigError, match="realistic.sync.deadline_seconds is not set"):
        check(config_with(realistic(tmp_path, good, **{"realistic.sync.wait": "deadline"})))
    with pytest.raises(ConfigError, match="realistic.paradigm"):
        check(config_with(realistic(tmp_path, good, **{"realistic.paradigm": "gossip"})))
    with pytest.raises(ConfigError, match="target_value"):
        check(config_with(realistic(tmp_path, good, **{"realistic.target_metric": "accuracy"})))


# algorithms whose math needs a whole synchronous round (their modules say why); the registry may
# add more, but these must stay refused
KNOWN_SYNC_ONLY = {"fedex-lora", "flexlora", "flora", "hetlora", "rolora", "scaffold", "fedmomentum", "ilora", "fedsvd"}


def test_every_sync_only_algorithm_is_refused_in_an_async_paradigm_at_load(tmp_path):
    sync_only = [name for name, cls in algorithms.available().items() if not cls.capabilities.asynchronous]
    assert KNOWN_SYNC_ONLY <= set(sync_only), f"no longer declared synchronous-only: {KNOWN_SYNC_ONLY - set(sync_only)}"
    good = write(tmp_path, GOOD)
    for name in sync_only:
        for paradigm in ("fedasync", "fedbuff"):
            with pytest.raises(ConfigError, match=f"algorithm '{name}' cannot run asynchronously"):
                check(config_with(realistic(tmp_path, good, **{"algorithm.name": name, "realistic.paradigm": paradigm})))


def test_the_cli_refuses_a_bad_system_with_one_line_exit_2_and_nothing_written(tmp_path):
    bad = write(tmp_path, {**GOOD, "devices": {"mix": {"iphone-99": 1}}})
    root = tmp_path / "runs"
    args = ["run", "--quiet", str(write(tmp_path, "{}\n", "empty.yaml"))]
    for item in realistic(tmp_path, bad):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown device profile 'iphone-99'" in lines[0] and "Traceback" not in result.output
    assert not root.exists() or not any(root.iterdir())


def test_profiles_follow_the_proportions_and_pins(tmp_path):
    spec = read_system(
        write(
            tmp_path,
            {
                "devices": {"mix": {"laptop": 1, "budget-phone": 3}, "clients": {0: "gpu-server", 7: "gpu-server"}},
                "networks": {"mix": {"wifi": 1, "4g": 1}},
            },
        )
    )
    config = config_with(["federation.clients=20000", "partition.name=iid"])
    fleet = resolve_fleet(config, spec)
    names = np.array(fleet.device_names)[fleet.device]
    assert names[0] == names[7] == "gpu-server"
    share = np.mean(names[8:] == "budget-phone")
    assert share == pytest.approx(0.75, abs=0.015)
    assert np.mean(np.array(fleet.network_names)[fleet.network] == "wifi") == pytest.approx(0.5, abs=0.015)
    # a client's profile depends on (seed, client), not on how many clients there are
    smaller = resolve_fleet(config_with(["federation.clients=100", "partition.name=iid"]), spec)
    assert list(np.array(smaller.device_names)[smaller.device]) == list(names[:100])
    other_seed = resolve_fleet(config_with(["federation.clients=100", "seed=3", "partition.name=iid"]), spec)
    assert list(np.array(other_seed.device_names)[other_seed.device]) != list(names[:100])


def test_vectorised_draws_equal_the_scalar_ones():
    draws = Draws(42)
    ids = np.arange(0, 5000, 7)
    assert list(draws.uniforms("x", ids, 3)) == [draws.uniform("x", int(i), 3) for i in ids]
    normals = draws.normals("y", ids, 2)
    assert np.allclose(normals, [draws.normal("y", int(i), 2) for i in ids], atol=1e-12)
    u = draws.uniforms("z", np.arange(100_000))
    assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01
    assert abs(normals.mean()) < 0.15 and abs(draws.normals("w", np.arange(100_000)).std() - 1.0) < 0.02


def test_daily_windows_repeat_with_jitter_and_skip_absent_days():
    spec = DailySpec(start_hour=22, hours=8, jitter_hours=1, presence=0.5, clock_start_hour=12)
    model = DailyWindows(spec, Draws(0), horizon_seconds=30 * 86400)
    windows, cursor = [], 0
    while (window := model.next(3, cursor)) is not None:
        start, end, cursor = window
        windows.append((start, end))
    assert 8 <= len(windows) <= 24, "about half of 30 days"
    for start, end in windows:
        assert end - start == pytest.approx(8 * 3600)
        clock = (start / 3600 + 12) % 24
        assert min(abs(clock - 22), abs(clock + 24 - 22)) <= 1.0 + 1e-9
    assert all(a[1] <= b[0] for a, b in pairwise(windows))


def per_client_windows(model, ids) -> dict[int, list[tuple[float, float]]]:
    """Every client's windows through the reference path, next(client, cursor)."""
    found = {}
    for client in ids:
        cursor, windows = 0, []
        while (window := model.next(int(client), cursor)) is not None:
            start, end, cursor = window
            windows.append((start, end))
        found[int(client)] = windows
    return found


def windows_by_chunks(model, ids) -> dict[int, list[tuple[float, float]]]:
    """The same, read in bulk chunk by chunk, checking each chunk's lower bound."""
    found = {int(client): [] for client in ids}
    chunk, bound = 0, model.chunk_start(0)
    while bound < math.inf:
        owners, starts, ends = model.windows_of_chunk(chunk, np.asarray(ids))
        assert len(owners) == len(starts) == len(ends)
        assert (starts >= bound).all() and (starts >= 0.0).all() and (ends > starts).all()
        for client, start, end in zip(owners.tolist(), starts.tolist(), ends.tolist(), strict=True):
            found[client].append((start, end))
        chunk += 1
        following = model.chunk_start(chunk)
        assert following >= bound  # bounds never go back
        bound = following
    return found


@pytest.mark.parametrize(
    "spec",
    [
        DailySpec(start_hour=22, hours=8, jitter_hours=1, presence=0.5, clock_start_hour=12),  # yesterday's window open at 0
        DailySpec(start_hour=1, hours=20, jitter_hours=1.5, presence=1.0, clock_start_hour=0),
        DailySpec(start_hour=9, hours=3, jitter_hours=0, presence=0.8, clock_start_hour=10),  # no jitter: ties
    ],
)
def test_daily_windows_in_bulk_are_exactly_the_per_client_windows(spec):
    """The simulation reads windows a day of every client at a time; the chunks hold exactly
    the windows next() gives, the same floats, each client's in order."""
    ids = np.arange(0, 300, 3)
    model = DailyWindows(spec, Draws(7), horizon_seconds=5 * 86400, clients=300)
    reference = per_client_windows(DailyWindows(spec, Draws(7), horizon_seconds=5 * 86400, clients=300), ids)
    assert sum(map(len, reference.values())) > 100
    assert windows_by_chunks(model, ids) == reference


def test_trace_windows_in_bulk_are_exactly_the_per_client_windows():
    rows = generate_trace(40, 5, seed=2)
    windows: dict[int, list[tuple[float, float]]] = {}
    for client, start, end in rows:
        windows.setdefault(client, []).append((start, end))
    for mapping, clients in (("id", 30), ("modulo", 70)):
        model = TraceWindows(windows, clients, mapping, offset=3600.0)
        ids = np.arange(clients)
        reference = per_client_windows(model, ids)
        assert sum(map(len, reference.values())) > 100
        assert windows_by_chunks(model, ids) == reference


def test_ranks_by_device_tier_reach_the_server_and_the_clients(tmp_path):
    native = [name for name, cls in algorithms.available().items() if cls.capabilities.mixed_ranks != "refuse" and name != "centralized"]
    system = write(
        tmp_path,
        {
            "devices": {
                "mix": {"laptop": 1, "budget-phone": 1},
                "clients": {0: "laptop", 1: "budget-phone", 2: "budget-phone", 3: "laptop"},
            },
            "networks": {"mix": {"ethernet": 1}},
            "ranks": {"by": "device", "device": {"laptop": 16, "budget-phone": 4}},
        },
    )
    given = config_with(realistic(tmp_path, system, **{"algorithm.name": "local-only" if "local-only" in native else native[0]}))
    run = resolve(given)
    config = run.config
    assert run.client_ranks == [config.rank_of(c) for c in range(4)] == [16, 4, 4, 16]
    from atoll.experiment import build

    experiment = build(given)
    try:
        assert experiment.server.context.client_ranks == [16, 4, 4, 16]
        assert [experiment.clients[c].context.rank for c in range(4)] == [16, 4, 4, 16]
    finally:
        experiment.close()
    # reloading the resolved config gives the same ranks (no conflict with what it wrote)
    again = tmp_path / "resolved.yaml"
    again.write_text(config.to_yaml())
    assert load_config(again) == config and resolve(load_config(again)).client_ranks == run.client_ranks


def test_mixed_ranks_from_the_system_are_refused_for_an_algorithm_that_cannot_mix_them(tmp_path):
    devices = {"mix": {"laptop": 1, "budget-phone": 3}, "clients": {0: "laptop", 1: "budget-phone"}}
    system = write(tmp_path, {**GOOD, "devices": devices, "ranks": {"by": "device", "device": {"laptop": 16, "budget-phone": 4}}})
    with pytest.raises(ConfigError, match="cannot aggregate different LoRA ranks"):
        check(config_with(realistic(tmp_path, system, **{"algorithm.name": "fedit"})))
    with pytest.raises(ConfigError, match="cannot aggregate different LoRA ranks"):
        check(config_with(realistic(tmp_path, system, **{"algorithm.name": "fedit", "realistic.dry_run": "true"})))


def test_one_rank_for_every_device_becomes_the_federation_rank(tmp_path):
    system = write(tmp_path, {**GOOD, "ranks": {"by": "device", "device": {"laptop": 4, "budget-phone": 4}}})
    given = config_with(realistic(tmp_path, system))
    run = resolve(given)
    config = run.config
    assert config.model.lora.rank == 4 and config.model.lora.client_ranks is None and run.client_ranks == [4] * 4
    assert given.model.lora.rank == 8, "resolving never rewrites the config it was given"


def test_ranks_by_memory_budget_pick_the_largest_rank_that_fits():
    config = config_with(["train.batch_size=8", "model.max_length=128"])
    geometry = Geometry(base_parameters=100_000_000, lora_parameters_per_rank=1_000_000, extra_parameters=0, hidden_size=768, layers=12)
    # frozen weights 400 MB + activations 34 * 8 * 128 * 768 * 12 * 2 bytes (~641 MB) + 16 MB per rank
    fixed = 100_000_000 * 4 + 34 * 8 * 128 * 768 * 12 * 2
    choices = MemoryRanks(usable_fraction=0.5, choices=[4, 8, 16, 32, 64])
    for memory_gb in (2.0, 2.5, 3.0, 8.0):
        budget = 0.5 * memory_gb * 2**30
        fitting = [r for r in (4, 8, 16, 32, 64) if fixed + 16 * 1_000_000 * r <= budget]
        assert memory_rank(memory_gb, geometry, config, choices) == (max(fitting) if fitting else None)
    assert memory_rank(1.0, geometry, config, choices) is None
    assert (
        memory_rank(2.5, geometry, config, choices)
        < memory_rank(3.0, geometry, config, choices)
        <= memory_rank(8.0, geometry, config, choices)
    )


def test_ranks_by_memory_are_refused_when_a_device_cannot_hold_the_model(tmp_path):
    system = write(
        tmp_path,
        {
            **GOOD,
            "ranks": {"by": "memory", "memory": {"usable_fraction": 0.01}},
            "workload": {"model_parameters": 1_000_000_000, "lora_parameters_per_rank": 1000, "hidden_size": 64, "layers": 2},
        },
    )
    with pytest.raises(ConfigError, match="cannot hold model"):
        check(config_with(realistic(tmp_path, system, **{"algorithm.name": "local-only"})))


def test_the_geometry_table_matches_the_built_model(tmp_path):
    from atoll.experiment import build
    from atoll.fl.federation import Federation
    from atoll.sim.realistic.backends import ModelBackend

    experiment = build(config_with(tiny_overrides(tmp_path)))
    try:
        measured = ModelBackend(Federation(experiment))
        table = BUILTIN_GEOMETRY["tiny-bert"]
        cost = measured.cost(8)
        assert cost.base_parameters == table.base_parameters
        assert cost.lora_parameters_per_rank == table.lora_parameters_per_rank
        assert cost.extra_parameters == table.extra_parameters
    finally:
        experiment.close()


def test_daily_windows_of_all_clients_at_once_equal_the_one_client_path():
    spec = DailySpec(start_hour=21.5, hours=7, jitter_hours=2, presence=0.7, clock_start_hour=3)
    batched = DailyWindows(spec, Draws(5), horizon_seconds=5 * 86400, clients=300)
    single = DailyWindows(spec, Draws(5), horizon_seconds=5 * 86400)
    for client in range(0, 300, 7):
        for day in range(-1, 6):
            assert batched.window_of_day(client, day) == single.window_of_day(client, day)


def test_the_cost_model_is_the_documented_formulas():
    """docs/realistic-mode.md: FLOPs = tokens (4 frozen + 6 trained parameters); tokens = steps x
    grad_accum x min(batch_size, examples) x mean tokens per example; a transfer takes
    bytes x 8 / (Mbit/s x 1e6) + latency."""
    from atoll.sim.realistic.cost import ModelCost, local_tokens, training_seconds, transfer_seconds

    cost = ModelCost(base_parameters=1_000, lora_parameters_per_rank=10, extra_parameters=5)
    assert cost.flops_per_token(4) == 4 * 1_000 + 6 * (10 * 4 + 5)
    assert local_tokens(steps=3, grad_accum=2, batch_size=16, examples=5, tokens_per_example=10.0) == 3 * 2 * 5 * 10
    assert local_tokens(steps=3, grad_accum=2, batch_size=4, examples=50, tokens_per_example=10.0) == 3 * 2 * 4 * 10
    assert training_seconds(tokens=300.0, flops_per_token=2_000.0, flops_per_second=1e6) == pytest.approx(0.6)
    assert transfer_seconds(nbytes=1_000_000, mbps=8.0, latency_seconds=0.05) == pytest.approx(1.05)
