"""User-facing errors: each carries one line saying what is wrong and how to fix it.

The CLI prints ``str(error)`` and exits with code 2; no traceback is shown for these.
Anything else that escapes is a bug in atoll and keeps its traceback.
"""

from __future__ import annotations


class AtollError(Exception):
    """Base of every error caused by user input (config, data, model, checkpoint)."""

    kind = "error"

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        line = f"{self.kind}: {self.message}"
        if self.fix:
            line += f" ({self.fix})"
        return line


class ConfigError(AtollError):
    kind = "config error"


class DataError(AtollError):
    kind = "data error"


class ModelError(AtollError):
    kind = "model error"


class CheckpointError(AtollError):
    kind = "checkpoint error"


class AlgorithmError(AtollError):
    """An algorithm refuses a configuration (e.g. heterogeneous ranks it cannot aggregate)."""

    kind = "algorithm error"


class UpdateError(AtollError):
    """A client update is malformed (wrong keys, shapes, non-finite values)."""

    kind = "update error"


class DivergenceError(AtollError):
    """Training diverged (the loss grew by orders of magnitude): a learning rate too high, usually."""

    kind = "run diverged"
