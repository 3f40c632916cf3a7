"""When devices are online: always, daily windows, or a recorded trace.

A model gives each client's windows [start, end) in virtual seconds, in order and without
overlap, two ways: one client at a time (``first`` then ``next``: the reference, and what the
tests compare against), and in bulk, a *chunk* of every client's windows at once
(``windows_of_chunk``: a day of daily windows, the windows starting on one day of a trace), as
numpy arrays, which is how the simulation reads them. Chunks are read in order and only when the
simulation's clock nears them (``chunk_start``), so a week of 100,000 clients never sits in memory
as events. Dropout is not a window: it cuts a job inside a window (see the engine).

Trace files are CSV with a header ``client,start,end``: a client id (integer >= 0) and a window in
seconds from the start of the trace. Lines starting with ``#`` and blank lines are skipped; any
other malformed row is a :class:`DataError` naming the file and line. ``python -m
atoll.sim.realistic.availability --clients 20 --days 7`` writes a generated example.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path

import numpy as np

from atoll.errors import DataError
from atoll.sim.realistic.draws import Draws, unit
from atoll.textfiles import read_text

INFINITY = math.inf
DAY = 86_400.0
HOUR = 3_600.0


class Availability:
    """Windows of one federation. ``first(client)`` and ``next(client, cursor)`` return
    ``(start, end, cursor)`` or None when the client has no further window."""

    always_on = False

    def first(self, client: int):
        return self.next(client, 0)

    def next(self, client: int, cursor: int):  # pragma: no cover - interface
        raise NotImplementedError

    # -- in bulk: chunk 0, 1, 2, ... in order ---------------------------------------------------------
    def chunk_start(self, chunk: int) -> float:  # pragma: no cover - interface
        """A lower bound on the start of every window of ``chunk`` and of every later chunk (starts
        as ``next`` returns them, never below 0); infinity when no window is left."""
        raise NotImplementedError

    def windows_of_chunk(self, chunk: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
        """The windows of ``chunk`` of the clients ``ids``: (client ids, starts, ends), the same
        windows as ``next`` gives (start clamped to 0, windows ending at or before 0 left out).
        Every window of a client is in exactly one chunk, and its chunks come in the order of
        its windows."""
        raise NotImplementedError


class AlwaysOn(Availability):
    always_on = True

    def next(self, client: int, cursor: int):
        return (0.0, INFINITY, 1) if cursor == 0 else None

    def chunk_start(self, chunk: int) -> float:
        return INFINITY  # online from the start and never offline: no window events at all


class DailyWindows(Availability):
    """A window of ``hours`` opening at ``start_hour`` every day, moved by a per (client, day)
    uniform jitter, present with probability ``presence``. Virtual time 0 is ``clock_start_hour``."""

    def __init__(self, spec, draws: Draws, horizon_seconds: float, clients: int | None = None):
        self.start = spec.start_hour * HOUR
        self.length = spec.hours * HOUR
        self.jitter = spec.jitter_hours * HOUR
        self.presence = spec.presence
        self.clock = spec.clock_start_hour * HOUR
        self.horizon = horizon_seconds
        self.draws = draws
        self.clients = clients
        self._presence_base = draws.base("daily-presence")
        self._jitter_base = draws.base("daily-jitter")
        self._days: dict[int, list[float]] = {}  # day -> start of every client's window (nan: absent)

    def window_of_day(self, client: int, day: int):
        """(start, end) of ``client``'s window on ``day`` (day 0 starts at virtual time 0 minus the
        clock offset), or None when the client does not show up that day."""
        if self.clients is not None and 0 <= client < self.clients:
            starts = self._days.get(day)
            if starts is None:
                starts = self._days[day] = self._starts_of_day(day).tolist()
            start = starts[client]
            return None if start != start else (start, start + self.length)  # nan: absent
        if self.presence < 1.0 and unit(self._presence_base, client, day + 1) >= self.presence:
            return None
        shift = (2.0 * unit(self._jitter_base, client, day + 1) - 1.0) * self.jitter if self.jitter else 0.0
        start = day * DAY + self.start + shift - self.clock
        return start, start + self.length

    def _starts_of_day(self, day: int, ids: np.ndarray | None = None) -> np.ndarray:
        """The window start of every client (or of ``ids``) on one day at once, nan where absent:
        the same draws and the same order of operations as the scalar path, so the same floats."""
        if ids is None:
            ids = np.arange(self.clients)
        shift = np.zeros(len(ids))
        if self.jitter:
            shift = (2.0 * self.draws.uniforms("daily-jitter", ids, day + 1) - 1.0) * self.jitter
        starts = (day * DAY + self.start + shift) - self.clock
        if self.presence < 1.0:
            starts[self.draws.uniforms("daily-presence", ids, day + 1) >= self.presence] = np.nan
        return starts

    # chunk c is day c - 1: "yesterday"'s window may still be open at time 0
    def _last_day(self) -> float:
        return self.horizon + self.clock + DAY  # the same limit as ``next``

    def chunk_start(self, chunk: int) -> float:
        day = chunk - 1
        if day * DAY > self._last_day():
            return INFINITY
        # the earliest start a jitter allows, computed in the same order as the starts themselves
        # (rounding is monotonic, so it cannot exceed any of them), less a second for good measure
        earliest = (day * DAY + self.start + -self.jitter) - self.clock - 1.0
        return earliest if earliest > 0.0 else 0.0

    def windows_of_chunk(self, chunk: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        day = chunk - 1
        ids = np.asarray(ids, dtype=np.int64)
        if day * DAY > self._last_day():
            return ids[:0], np.zeros(0), np.zeros(0)
        starts = self._starts_of_day(day, ids)
        ends = starts + self.length
        present = ends > 0.0  # false for nan (absent that day) and for windows over before time 0
        starts, ends = starts[present], ends[present]
        return ids[present], np.maximum(starts, 0.0), ends

    def next(self, client: int, cursor: int):
        # cursor encodes the next day to look at, offset by one so a window of "yesterday"
        # (day -1) that is still open at time 0 is found
        day = cursor - 1
        if self.clients is not None and 0 <= client < self.clients:
            # window_of_day's vectorised path, inlined (one call per window close)
            days, length, limit = self._days, self.length, self.horizon + self.clock + DAY
            while day * DAY <= limit:
                starts = days.get(day)
                if starts is None:
                    starts = days[day] = self._starts_of_day(day).tolist()
                start = starts[client]
                day += 1
                if start != start or start + length <= 0.0:  # nan: absent that day
                    continue
                return (start if start > 0.0 else 0.0), start + length, day + 1
            return None
        while day * DAY - self.clock - DAY <= self.horizon:
            window = self.window_of_day(client, day)
            day += 1
            if window is None or window[1] <= 0.0:
                continue
            start = window[0]
            return (start if start > 0.0 else 0.0), window[1], day + 1
        return None


class TraceWindows(Availability):
    """Windows read from a trace file (see the module docstring)."""

    def __init__(self, windows: dict[int, list[tuple[float, float]]], clients: int, mapping: str = "id", offset: float = 0.0):
        ids = sorted(windows)
        self.table: list[list[tuple[float, float]]] = []
        for client in range(clients):
            if mapping == "modulo":
                source = ids[client % len(ids)] if ids else None
            else:
                source = client
            rows = windows.get(source, []) if source is not None else []
            shifted = [(max(0.0, s - offset), e - offset) for s, e in rows if e - offset > 0.0]
            self.table.append(shifted)
        self.unused = sum(1 for k in ids if mapping == "id" and k >= clients)
        # in bulk: every window as flat arrays sorted by start (stable: a client's windows stay in
        # order); chunk c holds the windows starting on day c
        owner = [client for client, rows in enumerate(self.table) for _ in rows]
        starts = np.array([start for rows in self.table for start, _ in rows], dtype=np.float64)
        ends = np.array([end for rows in self.table for _, end in rows], dtype=np.float64)
        order = np.argsort(starts, kind="stable")
        self._owner, self._starts, self._ends = np.asarray(owner, dtype=np.int64)[order], starts[order], ends[order]
        self._chunks = int(self._starts[-1] // DAY) + 1 if len(self._starts) else 0

    def next(self, client: int, cursor: int):
        rows = self.table[client]
        if cursor < len(rows):
            start, end = rows[cursor]
            return start, end, cursor + 1
        return None

    def chunk_start(self, chunk: int) -> float:
        return chunk * DAY if chunk < self._chunks else INFINITY

    def windows_of_chunk(self, chunk: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        low, high = np.searchsorted(self._starts, [chunk * DAY, (chunk + 1) * DAY], side="left")
        owner = self._owner[low:high]
        wanted = np.isin(owner, np.asarray(ids, dtype=np.int64))
        return owner[wanted], self._starts[low:high][wanted], self._ends[low:high][wanted]

    def clients_without_windows(self) -> int:
        return sum(1 for rows in self.table if not rows)


def read_trace(path: str | Path) -> dict[int, list[tuple[float, float]]]:
    """Parse and validate a trace CSV into {client: sorted windows}; a bad row is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"trace file '{path}' does not exist", "check availability.trace.path (relative to the sys.yaml)")
    windows: dict[int, list[tuple[float, float]]] = {}
    header_seen = False
    text = read_text(path, DataError, "trace file")  # UTF-8 (a byte-order mark is skipped)
    for line_number, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        cells = [cell.strip() for cell in row]
        if not header_seen:
            if [c.lower() for c in cells] != ["client", "start", "end"]:
                raise DataError(
                    f"trace '{path}' line {line_number}: the header must be client,start,end (got {','.join(cells)})",
                    "see docs/realistic-mode.md",
                )
            header_seen = True
            continue
        if len(cells) != 3:
            raise DataError(f"trace '{path}' line {line_number}: expected 3 columns client,start,end, got {len(cells)}")
        try:
            client = int(cells[0])
            start, end = float(cells[1]), float(cells[2])
        except ValueError:
            raise DataError(f"trace '{path}' line {line_number}: '{','.join(cells)}' is not an integer client and two numbers") from None
        if client < 0:
            raise DataError(f"trace '{path}' line {line_number}: client id {client} is negative")
        if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end <= start:
            raise DataError(f"trace '{path}' line {line_number}: window {cells[1]}..{cells[2]} needs 0 <= start < end")
        windows.setdefault(client, []).append((start, end))
    if not header_seen:
        raise DataError(f"trace '{path}' is empty", "write a header client,start,end and one row per window")
    if not windows:
        raise DataError(f"trace '{path}' has a header but no windows")
    for client, rows in windows.items():
        rows.sort()
        for (s0, e0), (s1, e1) in zip(rows, rows[1:]):
            if s1 < e0:
                raise DataError(
                    f"trace '{path}': windows {s0:g}..{e0:g} and {s1:g}..{e1:g} of client {client} overlap", "merge them into one window"
                )
    return windows


def build_availability(spec, clients: int, draws: Draws, horizon_seconds: float, trace_file: Path | None) -> Availability:
    kind = spec.availability.windows
    if kind == "always":
        return AlwaysOn()
    if kind == "daily":
        return DailyWindows(spec.availability.daily, draws, horizon_seconds, clients)
    trace = spec.availability.trace
    return TraceWindows(read_trace(trace_file), clients, trace.map, trace.offset_seconds)


# ---------------------------------------------------------------------------------------------
# a generated example trace


def generate_trace(clients: int, days: int, seed: int = 0) -> list[tuple[int, float, float]]:
    """Smartphone-like availability: most devices charge overnight on wifi (a long window around
    23:00-07:00 with per-night jitter), some also show short daytime windows, a few are rarely on."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, float, float]] = []
    for client in range(clients):
        habit = rng.choice(["night", "night+day", "sparse"], p=[0.6, 0.3, 0.1])
        bedtime = rng.normal(23.0, 1.0)
        for day in range(days):
            windows = []
            if habit != "sparse" or rng.random() < 0.3:
                start = day * 24 + bedtime + rng.normal(0, 0.5)
                hours = max(1.0, rng.normal(7.0, 1.0))
                windows.append((start, start + hours))
            if habit == "night+day":
                for _ in range(rng.integers(1, 4)):
                    start = day * 24 + rng.uniform(8.0, 20.0)
                    windows.append((start, start + rng.uniform(0.25, 1.5)))
            for start, end in windows:
                rows.append((client, max(0.0, start) * HOUR, end * HOUR))
    rows.sort()
    merged: list[tuple[int, float, float]] = []
    for client, start, end in rows:
        if merged and merged[-1][0] == client and start <= merged[-1][2]:
            merged[-1] = (client, merged[-1][1], max(end, merged[-1][2]))
        else:
            merged.append((client, start, end))
    return [(c, round(s, 1), round(e, 1)) for c, s, e in merged if e > s]


def write_trace(rows: list[tuple[int, float, float]], handle, comment: str | None = None) -> None:
    if comment:
        handle.write(f"# {comment}\n")
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(["client", "start", "end"])
    for client, start, end in rows:
        writer.writerow([client, f"{start:.1f}", f"{end:.1f}"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write a generated availability trace (CSV client,start,end in seconds)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    comment = (
        f"generated by `python -m atoll.sim.realistic.availability --clients {args.clients} --days {args.days} --seed {args.seed}`: "
        "one row per online window, seconds from the start of the trace"
    )
    write_trace(generate_trace(args.clients, args.days, args.seed), sys.stdout, comment)


if __name__ == "__main__":
    main()
