"""Per-client private tensors (personal adapters, control variates) kept in RAM up to a budget,
then spilled least-recently-used first to safetensors files on disk."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from atoll.errors import CheckpointError


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class ClientStore:
    """``put(client_id, tensors)`` / ``get(client_id)``; the budget bounds resident bytes."""

    def __init__(self, budget_bytes: int = 512 * 2**20, spill_dir: Path | None = None):
        self.budget_bytes = int(budget_bytes)
        self._spill_dir = spill_dir
        self._owned_dir: tempfile.TemporaryDirectory | None = None
        self._memory: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._on_disk: set[int] = set()
        self.resident_bytes = 0
        self.spills = 0

    # -- storage ----------------------------------------------------------------------------------
    def _dir(self) -> Path:
        if self._spill_dir is None:
            self._owned_dir = tempfile.TemporaryDirectory(prefix="atoll-store-")
            self._spill_dir = Path(self._owned_dir.name)
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        return self._spill_dir

    def _path(self, client_id: int) -> Path:
        return self._dir() / f"client-{client_id}.safetensors"

    def put(self, client_id: int, tensors: dict[str, Tensor]) -> None:
        """Store a client's private tensors (replacing what it had). The store keeps references:
        callers pass tensors they no longer mutate."""
        self.discard(client_id)
        self._memory[client_id] = dict(tensors)
        self.resident_bytes += _nbytes(tensors)
        self._enforce_budget(keep=client_id)

    def get(self, client_id: int) -> dict[str, Tensor] | None:
        if client_id in self._memory:
            self._memory.move_to_end(client_id)
            return self._memory[client_id]
        if client_id in self._on_disk:
            tensors = load_file(str(self._path(client_id)))
            self._on_disk.discard(client_id)
            self._path(client_id).unlink(missing_ok=True)
            self._memory[client_id] = tensors
            self.resident_bytes += _nbytes(tensors)
            self._enforce_budget(keep=client_id)
            return tensors
        return None

    def discard(self, client_id: int) -> None:
        if client_id in self._memory:
            self.resident_bytes -= _nbytes(self._memory.pop(client_id))
        if client_id in self._on_disk:
            self._on_disk.discard(client_id)
            self._path(client_id).unlink(missing_ok=True)

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._memory or client_id in self._on_disk

    def __len__(self) -> int:
        return len(self._memory) + len(self._on_disk)

    def __bool__(self) -> bool:
        """A store is a store even when empty (``store or ClientStore()`` must not replace it)."""
        return True

    def client_ids(self) -> list[int]:
        return sorted(set(self._memory) | self._on_disk)

    def _enforce_budget(self, keep: int) -> None:
        while self.resident_bytes > self.budget_bytes and len(self._memory) > 1:
            victim, tensors = next(iter(self._memory.items()))
            if victim == keep:
                self._memory.move_to_end(victim)
                continue
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(self._path(victim)))
            del self._memory[victim]
            self._on_disk.add(victim)
            self.resident_bytes -= _nbytes(tensors)
            self.spills += 1

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write every client's tensors under ``directory`` (one file per client)."""
        directory.mkdir(parents=True, exist_ok=True)
        for client_id, tensors in self._memory.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / f"client-{client_id}.safetensors"))
        for client_id in self._on_disk:
            target = directory / f"client-{client_id}.safetensors"
            try:
                os.link(self._path(client_id), target)
            except OSError:
                shutil.copyfile(self._path(client_id), target)

    def load(self, directory: Path) -> None:
        """Replace the contents with a directory written by :meth:`save`."""
        for client_id in self.client_ids():
            self.discard(client_id)
        if not directory.is_dir():
            return
        for path in sorted(directory.glob("client-*.safetensors")):
            try:
                client_id = int(path.stem.split("-", 1)[1])
                tensors = load_file(str(path))
            except Exception:
                raise CheckpointError(
                    f"client state '{path}' is unreadable", "resume from an earlier checkpoint or start a new run"
                ) from None
            self.put(client_id, tensors)

    def close(self) -> None:
        if self._owned_dir is not None:
            self._owned_dir.cleanup()
            self._owned_dir = None
