"""Declared capabilities: one compatibility check reads the catalog's declarations (no method
inspection, no names), `atoll list algorithms` shows them, and a broken algorithm module breaks
only the runs that choose it."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from atoll import algorithms
from atoll.algorithms import catalog
from atoll.cli import app
from atoll.config import config_with
from atoll.errors import ConfigError
from atoll.resolve import resolve


def declare(monkeypatch, name: str, **capabilities) -> None:
    spec = catalog.SPECS[name]
    changed = dataclasses.replace(spec, capabilities=dataclasses.replace(spec.capabilities, **capabilities))
    monkeypatch.setitem(catalog.SPECS, name, changed)


def test_the_check_follows_the_declarations_and_nothing_else(monkeypatch, tmp_path):
    import shutil
    from pathlib import Path

    system = tmp_path / "lab.yaml"
    shutil.copy(Path(__file__).resolve().parents[2] / "configs/sys/homogeneous-lab.yaml", system)
    overrides = ["mode=realistic", f"system={system}", "realistic.paradigm=fedasync"]
    resolve(config_with(overrides + ["algorithm.name=fedit"]))
    declare(monkeypatch, "fedit", asynchronous=False)
    with pytest.raises(ConfigError, match="cannot run asynchronously"):
        resolve(config_with(overrides + ["algorithm.name=fedit"]))
    with pytest.raises(ConfigError, match="SecAgg"):
        resolve(config_with(["algorithm.name=flexlora", "engine=flower", "flower.secagg.enabled=true"]))
    declare(monkeypatch, "flexlora", weighted_mean=True)
    resolve(config_with(["algorithm.name=flexlora", "engine=flower", "flower.secagg.enabled=true"]))
    declare(monkeypatch, "fedprox", mixed_ranks="native")
    assert resolve(config_with(["algorithm.name=fedprox", "model.lora.client_ranks={1: 4}"])).client_ranks[:2] == [8, 4]
    declare(monkeypatch, "centralized", pooled_data=False)  # no special case by name
    resolve(config_with(["algorithm.name=centralized", "engine=flower"]))


def test_a_broken_algorithm_module_breaks_only_itself(monkeypatch):
    broken = dataclasses.replace(catalog.SPECS["fedit"], name="broken", module="does_not_exist")
    monkeypatch.setitem(catalog.SPECS, "broken", broken)
    assert "broken" in algorithms.specs()
    with pytest.raises(ModuleNotFoundError):
        algorithms.get_algorithm("broken")
    assert algorithms.get_algorithm("fedit").name == "fedit"
    result = CliRunner().invoke(app, ["list", "algorithms"])
    assert result.exit_code == 0 and "broken" in result.output


def test_list_algorithms_is_a_table_with_a_header_within_100_columns():
    result = CliRunner().invoke(app, ["list", "algorithms"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    header = next(line for line in lines if line.split()[:1] == ["name"])
    for column in ("mixed ranks", "async", "mean", "personal", "export", "global", "parameters"):
        assert column in header
    assert max(len(line.rstrip()) for line in lines) <= 100
    for name, spec in algorithms.specs().items():
        row = next(line for line in lines if line.split()[:1] == [name])
        assert spec.capabilities.mixed_ranks in row
        # every parameter name is whole on some line (the column wraps at commas, never inside a name)
        for parameter in spec.Params.model_fields:
            assert any(parameter in line.split() or f"{parameter}," in line.split() for line in lines), (name, parameter)
    assert "…" not in result.output


def test_the_algorithms_whose_clients_keep_state_declare_it():
    """``client_state`` (which keeps attacks crafted from colluders' updates off Flower, where a
    client's state stays on its node) is declared by exactly the algorithms whose module stores a
    client's private state in the ClientStore between rounds."""
    import importlib
    import inspect

    for name, spec in catalog.SPECS.items():
        if spec.capabilities.pooled_data:  # one pooled client, no federation
            continue
        source = inspect.getsource(importlib.import_module(f"atoll.algorithms.{spec.module}"))
        assert ("store.put(" in source) == spec.capabilities.client_state, name
