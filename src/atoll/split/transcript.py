"""What the model party actually received: the attacks' only view of the data party.

The model party records the decoded messages of the exchanges the record policy selects, in
memory and, when it has an output directory, as the very bytes that arrived
(``received/NNNNNN-<kind>.safetensors``, readable with :func:`atoll.split.wire.decode`).
Attacks read a transcript; they never touch the data party's objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from atoll.split.wire import decode

RECEIVED_DIR = "received"


@dataclass
class Received:
    """One message as the model party decoded it."""

    kind: str
    tensors: dict[str, Tensor]
    meta: dict[str, Any]

    @property
    def party(self) -> int:
        return int(self.meta.get("party", 0))

    @property
    def step(self) -> int:
        return int(self.meta.get("step", -1))


@dataclass
class RecordPolicy:
    """Which exchanges are kept: training steps ``step % every == 0`` (at most ``limit`` per data
    party), and the phases listed (train, eval, generate)."""

    every: int = 0
    limit: int = 8
    phases: tuple[str, ...] = ("train",)

    def wants(self, phase: str, party: int, step: int, kept: dict[tuple[int, str], set[int]]) -> bool:
        if self.every <= 0 or phase not in self.phases:
            return False
        if phase == "train" and step % self.every:
            return False
        steps = kept.setdefault((party, phase), set())
        return step in steps or len(steps) < self.limit


@dataclass
class Transcript:
    policy: RecordPolicy = field(default_factory=RecordPolicy)
    directory: Path | None = None
    messages: list[Received] = field(default_factory=list)
    _kept: dict[tuple[int, str], set[int]] = field(default_factory=dict)

    def offer(self, phase: str, raw: bytes, received: Received) -> None:
        """Keep ``received`` (and its raw bytes on disk) if the policy selects it."""
        if not self.policy.wants(phase, received.party, received.step, self._kept):
            return
        self._kept[(received.party, phase)].add(received.step)
        self.messages.append(received)
        if self.directory is not None:
            folder = self.directory / RECEIVED_DIR
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{len(self.messages) - 1:06d}-{received.kind}.safetensors").write_bytes(raw)

    def of_kind(self, kind: str) -> list[Received]:
        return [m for m in self.messages if m.kind == kind]

    @classmethod
    def load(cls, directory: Path) -> "Transcript":
        """A transcript read back from the bytes a model party wrote (e.g. in another process)."""
        transcript = cls(directory=None)
        folder = directory / RECEIVED_DIR
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            message = decode(path.read_bytes())
            transcript.messages.append(Received(message.kind, message.tensors, message.meta))
        return transcript
