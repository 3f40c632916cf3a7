"""A Flower app directory for one run: a pyproject.toml naming atoll's ServerApp and ClientApp and
carrying the resolved run (:meth:`atoll.resolve.ResolvedRun.to_json`) as run config. Nothing else is in it (the app directory is shipped
to the SuperLink and the SuperNodes with every run), so atoll itself must be installed wherever
the SuperLink and SuperNodes run."""

from __future__ import annotations

import json
from pathlib import Path

from atoll.engines.flower.protocol import RUN_DIR_KEY, RUN_KEY

APP_NAME = "atoll-run"


def _toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are a subset of TOML's)."""
    return json.dumps(text, ensure_ascii=False)


def pyproject_text(resolved_run: str, run_dir: str) -> str:
    return "\n".join(
        [
            "# Written by atoll: a Flower app that runs one atoll config (see docs/flower.md).",
            "[build-system]",
            'requires = ["hatchling"]',
            'build-backend = "hatchling.build"',
            "",
            "[project]",
            f'name = "{APP_NAME}"',
            'version = "1.0.0"',
            'description = "An atoll federated LoRA run"',
            'license = "Apache-2.0"',
            "dependencies = []  # atoll must already be installed on the SuperLink and every SuperNode",
            "",
            "[tool.flwr.app]",
            'publisher = "atoll"',
            "",
            "[tool.flwr.app.components]",
            'serverapp = "atoll.engines.flower.app:server_app"',
            'clientapp = "atoll.engines.flower.app:client_app"',
            "",
            "[tool.flwr.app.config]",
            f"{RUN_KEY} = {_toml_string(resolved_run)}",
            f"{RUN_DIR_KEY} = {_toml_string(run_dir)}",
            "",
        ]
    )


def write_app(directory: Path, run, run_dir: Path) -> Path:
    """Write the app for a resolved run (run directory ``run_dir``, made absolute) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(pyproject_text(run.to_json(), str(Path(run_dir).expanduser().absolute())))
    return directory
