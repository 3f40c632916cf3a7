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
    """One message as the model party decoded it (``tensors``, ``meta``: exactly what arrived),
    plus what the model party itself computed from it (``local``: its outputs for a forward, the
    gradients of its own parameters for a backward), which it knows anyway."""

    kind: str
    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    local: dict[str, Tensor] = field(default_factory=dict)

    @property
    def party(self) -> int:
        return int(self.meta.get("party", 0))

    @property
    def step(self) -> int:
        return int(self.meta.get("step", -1))


@dataclass
class RecordPolicy:
    """Which exchanges are kept: training steps from ``start`` on with ``step % every == 0`` (at
    most ``limit`` per data party), and the phases listed (train, eval, generate); with
    ``parameters``, the model party's own trainable parameters as they were at each kept training
    step."""

    every: int = 0
    limit: int = 8
    phases: tuple[str, ...] = ("train",)
    parameters: bool = False  # keep the model party's own trainable parameters with each kept training forward
    start: int = 1  # the first training step that may be kept

    def wants(self, phase: str, party: int, step: int, kept: dict[tuple[int, str], set[int]]) -> bool:
        if self.every <= 0 or phase not in self.phases:
            return False
        if phase == "train" and (step < self.start or step % self.every):
            return False
        steps = kept.setdefault((party, phase), set())
        return step in steps or len(steps) < self.limit


@dataclass
class Transcript:
    policy: RecordPolicy = field(default_factory=RecordPolicy)
    directory: Path | None = None
    messages: list[Received] = field(default_factory=list)
    _kept: dict[tuple[int, str], set[int]] = field(default_factory=dict)

    def offer(self, phase: str, raw: bytes, received: Received) -> bool:
        """Keep ``received`` (and its raw bytes on disk) if the policy selects it."""
        if not self.policy.wants(phase, received.party, received.step, self._kept):
            return False
        self._kept[(received.party, phase)].add(received.step)
        self.messages.append(received)
        if self.directory is not None:
            folder = self.directory / RECEIVED_DIR
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{len(self.messages) - 1:06d}-{received.kind}.safetensors").write_bytes(raw)
        return True

    def add_local(self, received: Received, tensors: dict[str, Tensor]) -> None:
        """Attach what the model party computed from a kept message (written next to it on disk)."""
        received.local.update({k: v.detach().clone() for k, v in tensors.items()})
        if self.directory is not None:
            from safetensors.torch import save_file

            index = next(i for i, m in enumerate(self.messages) if m is received)
            folder = self.directory / RECEIVED_DIR
            save_file({k: v.contiguous() for k, v in received.local.items()}, str(folder / f"{index:06d}-{received.kind}.local"))

    def of_kind(self, kind: str) -> list[Received]:
        return [m for m in self.messages if m.kind == kind]

    @classmethod
    def load(cls, directory: Path) -> "Transcript":
        """A transcript read back from the bytes a model party wrote (e.g. in another process)."""
        transcript = cls(directory=None)
        from safetensors.torch import load_file

        folder = directory / RECEIVED_DIR
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            message = decode(path.read_bytes())
            local_path = path.with_suffix(".local")
            local = load_file(str(local_path)) if local_path.is_file() else {}
            transcript.messages.append(Received(message.kind, message.tensors, message.meta, local))
        return transcript
