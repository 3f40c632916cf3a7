"""Events, client states and the event queue.

Events are plain tuples ``(time, sequence, kind, client, token)`` popped by virtual time, then by
the order they were scheduled, so ties never compare anything else and the same schedule always
pops in the same order. ``token`` lets a handler recognise events that belong to a job or window
that no longer exists (they are popped and ignored, not searched for).

The queue is a binary heap for the near future plus hourly buckets for the far future (a
two-level calendar queue): a day of 100,000 devices holds hundreds of thousands of pending window
events, and a heap of all of them would make every pop walk a deep, cache-cold tree. An event
whose bucket is not yet open waits in its bucket; a bucket joins the heap when the heap holds
nothing earlier than the bucket's start. The pop order is exactly that of a single heap.

A queue may have a *source* (the availability process): an object with ``next_time``, a lower
bound on the time of every event it has not given yet, and ``release()``, which pushes its next
batch of events (``push_many``). Before a bucket opens, the source releases every batch that could
hold an event of that bucket, so a pop still returns the earliest event there is.
"""

from __future__ import annotations

import heapq
import itertools
import math
from enum import IntEnum
from operator import itemgetter

import numpy as np


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

    __slots__ = ("heap", "counter", "next_sequence", "width", "front", "buckets", "keys", "run", "position", "source")

    def __init__(self, width: float = 3600.0) -> None:
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.counter = itertools.count(1)
        self.next_sequence = self.counter.__next__  # 1, 2, 3, ... (a C call, no Python frame)
        self.source = None  # see the module docstring
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

    def push_many(self, times, kinds, clients, tokens) -> None:
        """Push a batch at once: numpy arrays sorted by time, equal times in the order they
        should pop (each event gets the next sequence number in the order given). Finite times."""
        count = len(times)
        if not count:
            return
        if not np.isfinite(times).all() or (times[1:] < times[:-1]).any():
            raise ValueError("a batch of events needs finite times in sorted order")
        first = next(self.counter)
        if count > 1:
            next(itertools.islice(self.counter, count - 2, None))  # reserve first + 1 .. first + count - 1
        items = list(zip(times.tolist(), range(first, first + count), kinds.tolist(), clients.tolist(), tokens.tolist()))
        buckets = np.floor_divide(times, self.width)
        edges = [0, *(np.flatnonzero(np.diff(buckets)) + 1).tolist(), count]
        heap, waiting_buckets, keys, front = self.heap, self.buckets, self.keys, self.front
        for low, high in zip(edges, edges[1:]):
            bucket = float(buckets[low])
            if bucket <= front:
                for item in items[low:high]:
                    heapq.heappush(heap, item)
                continue
            waiting = waiting_buckets.get(bucket)
            if waiting is None:
                waiting_buckets[bucket] = items[low:high]
                heapq.heappush(keys, bucket)
            else:
                waiting.extend(items[low:high])

    def _open_next_bucket(self) -> bool:
        """Called only when the run and the heap are exhausted (every heap event belongs to an
        earlier bucket than any waiting one): let the source release what the next bucket could
        hold, then open it. False when nothing is left at all."""
        source, keys, width = self.source, self.keys, self.width
        while source is not None and source.next_time < INF and (not keys or source.next_time < (keys[0] + 1.0) * width):
            source.release()
            if self.heap:  # released into a bucket that is already open
                return True
        if not keys:
            return False
        bucket = heapq.heappop(keys)
        items = self.buckets.pop(bucket)
        self.front = bucket
        items.sort(key=_TIME)
        self.run = items
        self.position = 0
        return True

    def pending_source(self) -> bool:
        """Whether the source has events it has not released yet."""
        return self.source is not None and self.source.next_time < INF

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
            if not self._open_next_bucket():
                raise IndexError("pop from an empty event queue")

    def peek_time(self) -> float | None:
        while True:
            if self.position < len(self.run):
                first = self.run[self.position][0]
                return min(first, self.heap[0][0]) if self.heap else first
            if self.heap:
                return self.heap[0][0]
            if not self._open_next_bucket():
                return None

    def __len__(self) -> int:
        """Events pushed and not popped (a source's unreleased events are not counted)."""
        return len(self.heap) + sum(map(len, self.buckets.values())) + len(self.run) - self.position

    def __bool__(self) -> bool:  # a bucket exists only while it holds an event
        if self.heap or self.keys or self.position < len(self.run):
            return True
        return self.pending_source() and self.peek_time() is not None  # the source may have nothing left to give


INF = math.inf
_TIME = itemgetter(0)  # sort key: an event's time (C, no Python call per item)
