"""Where the model is cut: Head–Tail (two slices) or Head–Body–Tail (three), and which party owns
which blocks.

- **head-tail**: the data party holds the embeddings and the first ``head_blocks`` blocks; the
  model party holds the remaining blocks, the final norm and the task head. The model party
  returns the task outputs (logits); the data party computes the loss, so labels stay with it.
- **head-body-tail**: the data party also holds the last ``tail_blocks`` blocks, the final norm
  and the task head; the model party holds the body in between and returns hidden states, so
  neither labels nor outputs leave the data party.

(The two settings of VFLAIR-LLM: Gu et al., "VFLAIR-LLM: A Comprehensive Framework and Benchmark
for Split Learning of LLMs", KDD 2025.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from atoll.errors import ConfigError

PartitionKind = Literal["head-tail", "head-body-tail"]
Role = Literal["head", "body", "tail"]
Party = Literal["data", "model"]


@dataclass(frozen=True)
class SliceSpec:
    """One contiguous slice of the model: its blocks and whether it has the input or output end."""

    role: Role
    party: Party
    blocks: tuple[int, ...]
    has_input: bool
    has_output: bool


@dataclass(frozen=True)
class Cut:
    """A partition kind with its cut points, checked against the model's number of blocks."""

    kind: PartitionKind
    head_blocks: int
    tail_blocks: int
    num_blocks: int

    def __post_init__(self) -> None:
        if self.head_blocks < 0 or self.tail_blocks < 0:
            raise ConfigError("split.head_blocks and split.tail_blocks must be >= 0")
        if self.kind == "head-tail" and self.tail_blocks:
            raise ConfigError(
                f"split.tail_blocks={self.tail_blocks} needs partition head-body-tail",
                "set split.partition=head-body-tail or split.tail_blocks=0",
            )
        model_blocks = self.num_blocks - self.head_blocks - self.tail_blocks
        if model_blocks < 1:
            raise ConfigError(
                f"the cut leaves the model party {model_blocks} of the model's {self.num_blocks} blocks",
                f"keep split.head_blocks + split.tail_blocks <= {self.num_blocks - 1}",
            )

    def slices(self) -> list[SliceSpec]:
        """The slices in forward order."""
        head = SliceSpec("head", "data", tuple(range(self.head_blocks)), True, False)
        end = self.num_blocks - self.tail_blocks
        if self.kind == "head-tail":
            return [head, SliceSpec("tail", "model", tuple(range(self.head_blocks, self.num_blocks)), False, True)]
        return [
            head,
            SliceSpec("body", "model", tuple(range(self.head_blocks, end)), False, False),
            SliceSpec("tail", "data", tuple(range(end, self.num_blocks)), False, True),
        ]

    def of_party(self, party: Party) -> list[SliceSpec]:
        return [s for s in self.slices() if s.party == party]

    def model_slice(self) -> SliceSpec:
        """The one slice the model party holds (the tail in head-tail, the body in head-body-tail)."""
        return self.of_party("model")[0]

    @property
    def model_returns(self) -> str:
        """What the model party sends back: the task outputs, or hidden states for the data tail."""
        return "outputs" if self.kind == "head-tail" else "hidden"
