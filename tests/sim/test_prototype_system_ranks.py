"""A sys.yaml's ranks in prototype (synchronous) mode: the same per-client ranks as realistic mode
for the same file and seed (devices drawn from the seed, rank by device tier or memory budget),
reaching the server and the clients; its networks and availability do not apply there, and a file
that sets no ranks, or rank settings that conflict with its ranks, are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from atoll.cli import app
from atoll.config import config_with
from atoll.errors import ConfigError
from atoll.resolve import resolve
from atoll.sim.realistic.system import read_system, resolve_fleet
from conftest import tiny_overrides

SYSTEMS = Path(__file__).resolve().parents[2] / "configs" / "sys"
PHONES = SYSTEMS / "phones.yaml"  # ranks by device tier: laptop 16, flagship-phone 8, budget-phone 4


def invoke(args: list[str]):
    """The `atoll` command in this process, torch's thread count set back afterwards (a run in
    process leaves it changed)."""
    threads = torch.get_num_threads()
    try:
        return CliRunner().invoke(app, args)
    finally:
        torch.set_num_threads(threads)


def overrides(tmp_path, **extra) -> list[str]:
    values = {"algorithm.name": "hetlora", "federation.clients": 12, "seed": 3, "system": str(PHONES), **extra}
    return tiny_overrides(tmp_path / "runs", **values)


@pytest.mark.parametrize("seed", [3, 4])
def test_prototype_mode_takes_the_same_tier_ranks_as_realistic_mode(tmp_path, seed):
    prototype = resolve(config_with(overrides(tmp_path, seed=seed)))
    realistic = resolve(config_with(overrides(tmp_path, seed=seed, mode="realistic")))
    system = read_system(PHONES)
    fleet = resolve_fleet(config_with(overrides(tmp_path, seed=seed)), system)
    by_tier = [system.ranks.device[fleet.device_names[int(d)]] for d in fleet.device]
    assert prototype.client_ranks == realistic.client_ranks == by_tier
    assert len(set(by_tier)) > 1  # a mixed fleet, or the test would prove nothing
    assert [prototype.config.rank_of(c) for c in range(12)] == by_tier
    assert prototype.config.mode == "prototype" and prototype.config.system == str(PHONES.resolve())


def test_tier_ranks_reach_the_server_and_the_clients_of_a_prototype_run(tmp_path):
    from atoll.experiment import build

    given = config_with(overrides(tmp_path, **{"federation.clients": 4}))
    ranks = resolve(given).client_ranks
    experiment = build(given)
    try:
        assert experiment.server.context.client_ranks == ranks
        assert [experiment.clients[c].context.rank for c in range(4)] == ranks
    finally:
        experiment.close()


def test_a_prototype_run_records_the_tier_ranks(tmp_path):
    args = ["run", *[a for o in overrides(tmp_path, **{"federation.clients": 4, "federation.rounds": 1}) for a in ("--set", o)]]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    recorded = json.loads((run / "resolved.json").read_text())
    expected = resolve(config_with(overrides(tmp_path, **{"federation.clients": 4}))).client_ranks
    assert recorded["client_ranks"] == expected and recorded["system_path"] == str(PHONES.resolve())


def write(tmp_path, tree) -> Path:
    path = tmp_path / "sys.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"system": str(SYSTEMS / "homogeneous-lab.yaml")}, "has no effect in prototype mode"),
        ({"system": "no-such-sys.yaml"}, "does not exist"),
        ({"model.lora.rank_cycle": "[4, 8]"}, "rank_cycle conflicts with the ranks"),
        ({"model.lora.client_ranks": "{0: 2}"}, "client_ranks conflicts with the ranks"),
        ({"algorithm.name": "fedit"}, "cannot aggregate different LoRA ranks"),
        ({"realistic.paradigm": "fedasync"}, "has no effect without mode: realistic"),
    ],
)
def test_what_makes_no_sense_in_prototype_mode_is_refused_in_one_line(tmp_path, extra, fragment):
    with pytest.raises(ConfigError, match=fragment) as error:
        resolve(config_with(overrides(tmp_path, **extra)))
    assert "\n" not in str(error.value)
    if "conflicts" in fragment:
        assert "or remove system" in str(error.value)  # not 'set ranks.by: none', which prototype mode refuses


def test_the_cli_refuses_a_system_without_ranks_in_prototype_mode_with_exit_code_2(tmp_path):
    lab = write(tmp_path, {"devices": {"mix": {"laptop": 1}}, "networks": {"mix": {"ethernet": 1}}})
    args = ["run", *[a for o in overrides(tmp_path, system=str(lab)) for a in ("--set", o)]]
    result = invoke(args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "ranks.by: none" in result.output, result.output
    assert not (tmp_path / "runs").exists()
