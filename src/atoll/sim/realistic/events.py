"""Events, client states and the event queue.

Events are plain tuples ``(time, sequence, kind, client, token)`` popped by virtual time, then by
the order they were scheduled, so ties never compare anything else and the same schedule always
pops in the same order. ``token`` lets a handler recognise events that belong to a job or window
that no longer exists (they are popped and ignored, not searched for).

The queue is a binary heap for the near future plus hourly buckets for the far future (a
two-level calendar queue): a week of 100,000 devices keeps one pending window event per device,
and a heap of all of them would make every pop walk a deep, cache-cold tree. An event whose bucket
is not yet open waits in its bucket; a bucket joins the heap when the heap holds nothing earlier
than the bucket's start. The pop order is exactly that of a single heap.
"""

from __future__ import annotations

import heapq
import itertools
import math
from operator import itemgetter
from enum import IntEnum


class EventKind(IntEnum):
    WINDOW_OPEN = 0  # a device comes online (window start)
    WINDOW_CLOSE = 1  # it goes offline; work in progress is lost
    DOWNLOAD_DONE = 2  # the global adapter arrived; local training starts
    TRAINING_DONE = 3  # local training finished; the upload starts
    UPLOAD_DONE = 4  # the update reached the server
    DROPOUT = 5  # the device dropped out mid-job; work is lost
    REJOIN = 6  # a dropped device is back (its window is still open)
    DEADLINE = 7  # a synchronous round's deadline
    SERVER_WAKE = 8  # the server looks at who is available (after same-time events settled)


class ClientState(IntEnum):
    IDLE = 0  # offline
    AVAILABLE = 1  # online, not working
    DOWNLOADING = 2
    TRAINING = 3
    UPLOADING = 4


class EventQueue:
    """Min-order of ``(time, sequence, kind, client, token)``.

    Events for the hour already open go to a binary heap; events for later hours wait in hourly
    buckets. When the heap and the current run are exhausted, the next bucket opens: its events
    are sorted once by time (a stable C sort on float keys; the bucket lists them in sequence
    order, so ties keep scheduling order) and then consumed front to back, merged with the heap.
    Most events of a long run (availability windows) are scheduled hours ahead, so they are
    sorted in bulk instead of sifting through a deep heap one by one. The pop order is exactly
    that of a single heap over (time, sequence)."""

    __slots__ = ("heap", "next_sequence", "width", "front", "buckets", "keys", "run", "position")

    def __init__(self, width: float = 3600.0) -> None:
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.next_sequence = itertools.count(1).__next__  # 1, 2, 3, ... (a C call, no Python frame)
        self.width = float(width)
        # buckets are keyed by ``time // width`` as a float (no int() call per push); those with a
        # key <= front are open (their events go to the heap)
        self.front = 0.0
        self.buckets: dict[float, list[tuple[float, int, int, int, int]]] = {}
        self.keys: list[float] = []  # heap of bucket keys not yet opened
        self.run: list[tuple[float, int, int, int, int]] = []  # the open bucket, sorted
        self.position = 0  # next unread item of ``run``

    def push(self, time: float, kind: int, client: int = -1, token: int = 0) -> None:
        if not -INF < time < INF:  # also catches nan, which would corrupt the order silently
            raise ValueError(f"event time must be finite, got {time!r}")
        item = (time, self.next_sequence(), kind, client, token)
        bucket = time // self.width
        if bucket <= self.front:
            heapq.heappush(self.heap, item)
            return
        waiting = self.buckets.get(bucket)
        if waiting is None:
            self.buckets[bucket] = [item]
            heapq.heappush(self.keys, bucket)
        else:
            waiting.append(item)

    def _open_next_bucket(self) -> None:
        """Called only when the run and the heap are exhausted (every heap event belongs to an
        earlier bucket than any waiting one)."""
        bucket = heapq.heappop(self.keys)
        items = self.buckets.pop(bucket)
        self.front = bucket
        items.sort(key=_TIME)
        self.run = items
        self.position = 0

    def pop(self) -> tuple[float, int, int, int, int]:
        """The earliest event (IndexError when empty)."""
        while True:
            run, position, heap = self.run, self.position, self.heap
            if position < len(run):
                item = run[position]
                if heap and heap[0] < item:
                    return heapq.heappop(heap)
                self.position = position + 1
                return item
            if heap:
                return heapq.heappop(heap)
            if not self.keys:
                raise IndexError("pop from an empty event queue")
            self._open_next_bucket()

    def peek_time(self) -> float | None:
        while True:
            if self.position < len(self.run):
                first = self.run[self.position][0]
                return min(first, self.heap[0][0]) if self.heap else first
            if self.heap:
                return self.heap[0][0]
            if not self.keys:
                return None
            self._open_next_bucket()

    def __len__(self) -> int:
        return len(self.heap) + sum(map(len, self.buckets.values())) + len(self.run) - self.position

    def __bool__(self) -> bool:  # a bucket exists only while it holds an event
        return bool(self.heap) or bool(self.keys) or self.position < len(self.run)


INF = math.inf
_TIME = itemgetter(0)  # sort key: an event's time (C, no Python call per item)
