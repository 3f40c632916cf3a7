"""How a run reports progress: rich bars on a terminal, plain log lines with --quiet, or nothing."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("atoll")


class Progress:
    """Silent base; the runner calls these in order."""

    def start(self, rounds: int, first_round: int) -> None: ...
    def round_start(self, round: int, clients: list[int]) -> None: ...
    def client_done(self, round: int, client_id: int, metrics: dict[str, float]) -> None: ...
    def round_end(self, round: int, record: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


def _round_line(record: dict[str, Any]) -> str:
    parts = [f"round {record['round']}"]
    if "loss" in record.get("train", {}):
        parts.append(f"train loss {record['train']['loss']:.4f}")
    for scope in ("global", "local"):
        metrics = record.get(scope) or {}
        for key in ("accuracy", "exact_match", "loss"):
            if key in metrics:
                parts.append(f"{scope} {key} {metrics[key]:.4f}")
                break
    parts.append(f"{record.get('wall_seconds', 0):.1f}s")
    return " | ".join(parts)


class LogProgress(Progress):
    """One log line per round (``--quiet``)."""

    def message(self, text: str) -> None:
        log.info(text)

    def round_end(self, round: int, record: dict[str, Any]) -> None:
        log.info(_round_line(record))


class RichProgress(Progress):
    """A bar over rounds and a bar over the clients of the current round."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.bars = Bars(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.rounds_task = None
        self.clients_task = None

    def start(self, rounds: int, first_round: int) -> None:
        self.bars.start()
        self.rounds_task = self.bars.add_task("rounds", total=rounds, completed=first_round - 1)
        self.clients_task = self.bars.add_task("clients", total=1, completed=0)

    def round_start(self, round: int, clients: list[int]) -> None:
        self.bars.reset(self.clients_task, total=len(clients), description=f"round {round} clients")

    def client_done(self, round: int, client_id: int, metrics: dict[str, float]) -> None:
        self.bars.advance(self.clients_task)

    def round_end(self, round: int, record: dict[str, Any]) -> None:
        self.bars.advance(self.rounds_task)
        self.bars.console.print(_round_line(record))

    def message(self, text: str) -> None:
        self.console.print(text)

    def close(self) -> None:
        self.bars.stop()


def make_progress(quiet: bool) -> Progress:
    if quiet or not sys.stderr.isatty():
        return LogProgress()
    return RichProgress()
