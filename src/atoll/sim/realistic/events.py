"""Events, client states and the event queue.

Events are plain tuples ``(time, sequence, kind, client, token)`` popped by virtual time, then by
the order they were scheduled, so ties never compare anything else and the same schedule always
pops in the same order. ``token`` lets a handler recognise events that belong to a job or window
that no longer exists (they are popped and ignored, not searched for).

The queue is a binary heap for the near future plus hourly buckets for the far future (a
two-level calendar queue), so that many pending events do not make every pop walk a deep,
cache-cold tree. An event whose bucket is not yet open waits in its bucket; a bucket joins the
heap when the heap holds nothing earlier than the bucket's start. The pop order is exactly that of
a single heap.

A queue may also have a *source* of window events (the availability process), which are nearly
all the events of a long run. They never become tuples: the source releases them an hour (one
bucket) at a time as three flat lists (times, signed clients, window ends; see
:meth:`EventQueue.attach`), the *stream*, whose events take consecutive sequence numbers, and
``pop`` merges the stream with the heap and the open bucket by (time, sequence). Whenever a bucket
opens, every stream event before its end has been released, so the merge is exact.
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

    __slots__ = (
        "heap",
        "counter",
        "next_sequence",
        "width",
        "front",
        "buckets",
        "keys",
        "run",
        "position",
        "source",
        "stream_times",
        "stream_clients",
        "stream_ends",
        "stream_base",
        "stream_position",
    )

    def __init__(self, width: float = 3600.0) -> None:
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.counter = itertools.count(1)
        self.next_sequence = self.counter.__next__  # 1, 2, 3, ... (a C call, no Python frame)
        self.width = float(width)
        # buckets are keyed by ``time // width`` as a float (no int() call per push); those with a
        # key <= front are open (their events go to the heap)
        self.front = 0.0
        self.buckets: dict[float, list[tuple[float, int, int, int, int]]] = {}
        self.keys: list[float] = []  # heap of bucket keys not yet opened
        self.run: list[tuple[float, int, int, int, int]] = []  # the open bucket, sorted
        self.position = 0  # next unread item of ``run``
        # the stream: window events released through the end of the open bucket
        self.source = None
        self.stream_times: list[float] = []
        self.stream_clients: list[int] = []  # client index for an opening, ~index (< 0) for a closing
        self.stream_ends: list[float] = []  # the window's end: the events' token
        self.stream_base = 0  # sequence number of stream item 0
        self.stream_position = 0

    def attach(self, source) -> None:
        """Take window events from ``source``: an object with ``next_time`` (a lower bound on the
        time of every event it has not released; infinity when none is left) and
        ``release(until)``, which returns every unreleased event before ``until`` as numpy arrays
        (times, signed clients, ends) sorted by time, equal times in the order they should pop."""
        self.source = source
        self._release()

    def _release(self) -> None:
        """Refill the (consumed) stream with the source's events up to the open bucket's end."""
        source = self.source
        if source is None or source.next_time >= (self.front + 1.0) * self.width:
            self.stream_times, self.stream_clients, self.stream_ends, self.stream_position = [], [], [], 0
            return
        times, clients, ends = source.release((self.front + 1.0) * self.width)
        count = len(times)
        if count and (not np.isfinite(times).all() or (times[1:] < times[:-1]).any()):
            raise ValueError("a source's events need finite times in sorted order")
        self.stream_base = next(self.counter)
        if count > 1:
            next(itertools.islice(self.counter, count - 2, None))  # reserve base + 1 .. base + count - 1
        self.stream_times, self.stream_clients, self.stream_ends = times.tolist(), clients.tolist(), ends.tolist()
        self.stream_position = 0

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

    def advance(self) -> bool:
        """Called only when the run, the heap and the stream are exhausted: open the next bucket
        (or, when the next event is a window event, the bucket it falls in) with the stream
        released through its end. False when nothing is left at all."""
        keys, width, source = self.keys, self.width, self.source
        while True:
            waiting = keys[0] if keys else INF
            released = source.next_time // width if source is not None and source.next_time < INF else INF
            if waiting == INF and released == INF:
                return False
            if waiting <= released:
                bucket = heapq.heappop(keys)
                items = self.buckets.pop(bucket)
                items.sort(key=_TIME)
                self.run = items
            else:
                bucket = released  # only window events in it (so far)
                self.run = []
            self.front = bucket
            self.position = 0
            self._release()
            if self.run or self.stream_times:
                return True

    def _stream_item(self) -> tuple[float, int, int, int, float]:
        position = self.stream_position
        client = self.stream_clients[position]
        self.stream_position = position + 1
        kind = WINDOW_OPEN if client >= 0 else WINDOW_CLOSE
        return (
            self.stream_times[position],
            self.stream_base + position,
            kind,
            client if client >= 0 else ~client,
            self.stream_ends[position],
        )

    def _head(self) -> tuple[float, int, int, int, int] | None:
        """The earliest pushed event of the open bucket and the heap (None: both exhausted)."""
        if self.position < len(self.run):
            item = self.run[self.position]
            return self.heap[0] if self.heap and self.heap[0] < item else item
        return self.heap[0] if self.heap else None

    def _stream_first(self, head) -> bool:
        position = self.stream_position
        if position >= len(self.stream_times):
            return False
        time = self.stream_times[position]
        return head is None or time < head[0] or (time == head[0] and self.stream_base + position < head[1])

    def pop(self) -> tuple[float, int, int, int, int]:
        """The earliest event (IndexError when empty); a window event comes as
        ``(time, sequence, WINDOW_OPEN or WINDOW_CLOSE, client, window end)``."""
        while True:
            head = self._head()
            if self._stream_first(head):
                return self._stream_item()
            if head is not None:
                if self.heap and self.heap[0] is head:
                    return heapq.heappop(self.heap)
                self.position += 1
                return head
            if not self.advance():
                raise IndexError("pop from an empty event queue")

    def peek_time(self) -> float | None:
        while True:
            head = self._head()
            if self._stream_first(head):
                return self.stream_times[self.stream_position]
            if head is not None:
                return head[0]
            if not self.advance():
                return None

    def __len__(self) -> int:
        """Events pushed or released and not popped (a source's unreleased events are not counted)."""
        pushed = len(self.heap) + sum(map(len, self.buckets.values())) + len(self.run) - self.position
        return pushed + len(self.stream_times) - self.stream_position

    def __bool__(self) -> bool:  # a bucket exists only while it holds an event
        if self.heap or self.keys or self.position < len(self.run) or self.stream_position < len(self.stream_times):
            return True
        return self.source is not None and self.source.next_time < INF and self.peek_time() is not None


INF = math.inf
WINDOW_OPEN, WINDOW_CLOSE = int(EventKind.WINDOW_OPEN), int(EventKind.WINDOW_CLOSE)
_TIME = itemgetter(0)  # sort key: an event's time (C, no Python call per item)
