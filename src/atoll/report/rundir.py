"""The run directory: resolved config, metrics.jsonl, checkpoints, summary, plots, adapters.

Files are written to a temporary name and renamed into place, so a killed run never leaves a
half-written file; a checkpoint directory appears whole or not at all, and carries checksums
that resume verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atoll.config import Config, build_config, read_yaml
from atoll.errors import AtollError, CheckpointError, ConfigError

if TYPE_CHECKING:  # torch is imported where checkpoints are read or written: the resolve step checks paths without it
    from torch import Tensor

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RESOLVED_FILE = "resolved.json"
CHECKPOINTS = "checkpoints"


def write_atomic(path: Path, data: bytes | str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class RunDir:
    def __init__(self, path: Path):
        self.path = path

    # -- creation -----------------------------------------------------------------------------------
    @staticmethod
    def choose_path(config: Config) -> Path:
        if config.run.dir:
            return Path(config.run.dir).expanduser()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(config.run.root).expanduser() / f"{config.name}-{stamp}"
        path, suffix = base, 1
        while path.exists():
            suffix += 1
            path = base.with_name(f"{base.name}-{suffix}")
        return path

    @staticmethod
    def check_location(path: Path, what: str = "run directory") -> None:
        """``path`` can be created as a directory: nothing on the way is a file and its nearest
        existing ancestor is a directory where one can be made (probed by making and removing an
        empty one: permission bits do not tell for root, nor for read-only or virtual filesystems)."""
        path = Path(path).expanduser().absolute()
        ancestor = path
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            where = "is" if ancestor == path else f"would be inside '{ancestor}', which is"
            raise ConfigError(f"{what} '{path}' {where} a file", "set run.root or run.dir to a directory")
        try:
            longest = os.pathconf(ancestor, "PC_NAME_MAX")
        except (OSError, ValueError):
            longest = 255
        for part in path.relative_to(ancestor).parts:
            if len(part.encode()) > longest:
                raise ConfigError(
                    f"the {what} would be named '{part[:40]}...', {len(part.encode())} bytes; this filesystem allows {longest}",
                    "use a shorter name, or set run.root or run.dir to a shorter path",
                )
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".atoll-probe-", dir=ancestor))
        except OSError as exc:
            raise ConfigError(
                f"cannot create the {what} '{path}': '{ancestor}' is not writable ({exc.strerror})",
                "set run.root (or run.dir) to a directory you can write, e.g. --set run.root=$HOME/atoll-runs",
            ) from None

    @classmethod
    def check_new(cls, path: Path) -> None:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(
                f"run directory '{path}' already exists and is not empty", "choose another run.dir, or continue it with --resume"
            )
        cls.check_location(path)

    @classmethod
    def create(cls, path: Path, config: Config, resolved: str | None = None) -> "RunDir":
        """A new run directory holding the run's config (every key) and, when given, the resolved
        run (``resolved.json``: client ranks, system file, absolute paths), written once."""
        cls.check_new(path)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        write_atomic(path / CONFIG_FILE, config.to_yaml())
        if resolved is not None:
            write_atomic(path / RESOLVED_FILE, resolved)
        (path / METRICS_FILE).touch()
        return run

    @classmethod
    def open_existing(cls, path: Path) -> tuple["RunDir", Config]:
        """The run directory at ``path`` and its config, for resuming: it must hold a readable
        config.yaml and be writable."""
        if not path.is_dir():
            raise CheckpointError(f"run directory '{path}' does not exist", "pass the directory a previous `atoll run` created")
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(
                f"'{path}' is not a run directory (no {CONFIG_FILE})", "pass the directory a previous `atoll run` created"
            )
        try:
            config = build_config(read_yaml(path / CONFIG_FILE))
        except AtollError as error:
            raise CheckpointError(
                f"the run's {path / CONFIG_FILE} is not a valid config: {error.message}", "start a new run instead of resuming this one"
            ) from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise CheckpointError(f"run directory '{path}' is not writable", "resume from a copy you can write")
        return cls(path), config

    # -- metrics --------------------------------------------------------------------------------------
    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is discarded
        return records

    def truncate_metrics(self, last_round: int) -> list[dict[str, Any]]:
        kept = [r for r in self.read_metrics() if r.get("round", 0) <= last_round]
        write_atomic(self.path / METRICS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        return kept

    # -- checkpoints ----------------------------------------------------------------------------------
    def checkpoint_dir(self, round: int) -> Path:
        return self.path / CHECKPOINTS / f"round-{round:05d}"

    def save_checkpoint(self, round: int, server_tensors: dict[str, Tensor], save_clients, meta: dict[str, Any], keep: int | None) -> None:
        final = self.checkpoint_dir(round)
        staging = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in server_tensors.items()}, str(staging / "server.safetensors"))
        save_clients(staging / "clients")
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        meta = dict(meta, round=round, files={str(p.relative_to(staging)): _sha256(p) for p in files})
        write_atomic(staging / "meta.json", json.dumps(meta, indent=1, sort_keys=True))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        if keep is not None:
            for old in self.checkpoint_rounds()[:-keep]:
                shutil.rmtree(self.checkpoint_dir(old), ignore_errors=True)

    def checkpoint_rounds(self) -> list[int]:
        root = self.path / CHECKPOINTS
        if not root.is_dir():
            return []
        rounds = []
        for entry in root.iterdir():
            if entry.is_dir() and entry.name.startswith("round-"):
                try:
                    rounds.append(int(entry.name.split("-", 1)[1]))
                except ValueError:
                    continue
        return sorted(rounds)

    def load_checkpoint(self, round: int) -> tuple[dict[str, Tensor], Path, dict[str, Any]]:
        """Verify and load the checkpoint of ``round``: (server tensors, clients dir, meta)."""
        directory = self.checkpoint_dir(round)
        fix = f"delete '{directory}' to resume from the checkpoint before it, or start a new run"
        try:
            meta = json.loads((directory / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise CheckpointError(f"checkpoint '{directory}' has no readable meta.json", fix) from None
        for relative, expected in meta.get("files", {}).items():
            path = directory / relative
            if not path.is_file() or _sha256(path) != expected:
                raise CheckpointError(f"checkpoint file '{path}' is missing or corrupted (checksum mismatch)", fix)
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(directory / "server.safetensors"))
        except Exception:
            raise CheckpointError(f"checkpoint '{directory}' has an unreadable server state", fix) from None
        return tensors, directory / "clients", meta

    # -- final outputs ----------------------------------------------------------------------------------
    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.path / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True))

    def replace_dir(self, name: str, fill) -> Path:
        """Create directory ``name`` atomically: ``fill(staging_path)`` then rename into place."""
        final = self.path / name
        staging = self.path / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        fill(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        return final
