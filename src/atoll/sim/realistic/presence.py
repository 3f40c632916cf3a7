"""Who is online: the availability process that feeds the event simulation.

:class:`AvailabilityProcess` owns everything about presence: each client's windows (drawn one at
a time from an :class:`~atoll.sim.realistic.availability.Availability` model: always on, daily
windows or a trace), the pool of online idle clients, going offline on a dropout and rejoining
later, and the online-time accounting. It schedules its own events (WINDOW_OPEN, WINDOW_CLOSE,
REJOIN) into the simulation's queue and handles them; the simulation handles jobs and the server.

Window events are nearly all the events of a long run (one opening and one closing per device per
day, against a handful per job), so :meth:`AvailabilityProcess.window_handlers` returns the two
handlers as closures over local names (the pool's arrays, the queue's heap and buckets): the event
loop calls them directly, without attribute lookups or method dispatch. They are the only code
for window events.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable

import numpy as np

from atoll.sim.realistic.availability import Availability
from atoll.sim.realistic.events import ClientState, EventKind, EventQueue

INF = math.inf
IDLE, AVAILABLE, DOWNLOADING = int(ClientState.IDLE), int(ClientState.AVAILABLE), int(ClientState.DOWNLOADING)
WINDOW_OPEN, WINDOW_CLOSE, REJOIN = int(EventKind.WINDOW_OPEN), int(EventKind.WINDOW_CLOSE), int(EventKind.REJOIN)


class AvailablePool:
    """Clients that are online and idle: O(1) add, remove and uniform pick; sorted ids on demand."""

    def __init__(self, size: int):
        self.items: list[int] = []
        self.position = [-1] * size
        self.mask = bytearray(size)  # 1 = available; a bytearray store is far cheaper than numpy's

    def add(self, index: int) -> None:
        if self.position[index] < 0:
            self.position[index] = len(self.items)
            self.items.append(index)
            self.mask[index] = 1

    def remove(self, index: int) -> None:
        where = self.position[index]
        if where < 0:
            return
        last = self.items.pop()
        if last != index:
            self.items[where] = last
            self.position[last] = where
        self.position[index] = -1
        self.mask[index] = 0

    def pick(self, u: float) -> int:
        return self.items[int(u * len(self.items))]

    def sorted(self) -> np.ndarray:
        return np.flatnonzero(np.frombuffer(self.mask, dtype=np.bool_))  # bool: ~7x faster than uint8

    def __len__(self) -> int:
        return len(self.items)


class AvailabilityProcess:
    """Presence of ``clients`` (SimClient objects, index = position) under ``availability``.

    A client's presence fields (``window_id``, ``window_cursor``, ``window_start``, ``window_end``,
    ``pending_end``, ``available_seconds``) are written only here. ``timeline`` receives the
    "online" segments of clients with index < ``timeline_limit``."""

    def __init__(self, clients, availability: Availability, queue: EventQueue, rejoin_seconds: float, timeline: list, timeline_limit: int):
        self.clients = clients
        self.availability = availability
        self.queue = queue
        self.rejoin_seconds = rejoin_seconds
        self.timeline = timeline
        self.timeline_limit = timeline_limit
        self.pool = AvailablePool(len(clients))

    # -- the start and the end of a run ---------------------------------------------------------------
    def start(self) -> None:
        """Every client's first window (always-on clients are online from time 0)."""
        always = self.availability.always_on
        for client in self.clients:
            if client.pooled:  # the server's own client: always there, never in the pool
                client.state = AVAILABLE
                continue
            if always:
                client.state = AVAILABLE
                client.window_start = 0.0
                client.window_end = INF
                self.pool.add(client.index)
            else:
                self._schedule_next_window(client, 0.0)

    def finish(self, client, now: float) -> None:
        """Account the online time of ``client`` if it is still online when the run ends."""
        if client.window_start >= 0.0 and not client.pooled:
            client.available_seconds += now - client.window_start
            self._segment(client, client.window_start, now)

    # -- what the paradigms may ask -------------------------------------------------------------------
    def available_ids(self) -> np.ndarray:
        """Sorted ids of online idle clients (pooled server-side clients are never listed)."""
        return self.pool.sorted()

    def is_available(self, index: int) -> bool:
        return self.clients[index].state == AVAILABLE

    # -- jobs take clients out of the pool and give them back -----------------------------------------
    def busy(self, index: int) -> None:
        self.pool.remove(index)

    def idle(self, client) -> None:
        """A job ended and the client is still online: available again."""
        client.state = AVAILABLE
        if not client.pooled:
            self.pool.add(client.index)

    # -- dropout and rejoin ---------------------------------------------------------------------------
    def going_offline(self, client, now: float) -> None:
        """A dropout: the online stretch ends now (called before the job is lost)."""
        if client.window_start >= 0.0:
            client.available_seconds += now - client.window_start
            self._segment(client, client.window_start, now)
        client.window_start = -1.0

    def offline(self, client, now: float) -> None:
        """After the dropout's job was lost: offline, back in ``rejoin_seconds`` if the window lasts."""
        client.state = IDLE
        self.pool.remove(client.index)
        if now + self.rejoin_seconds < client.window_end:
            self.queue.push(now + self.rejoin_seconds, REJOIN, client.index, client.window_id)

    def rejoin(self, index: int, token: int, now: float) -> bool:
        """A dropped device is back (False: the event is stale)."""
        client = self.clients[index]
        if token != client.window_id or client.state != IDLE or now >= client.window_end:
            return False
        client.state = AVAILABLE
        client.window_start = now
        self.pool.add(index)
        return True

    # -- windows ----------------------------------------------------------------------------------------
    def _segment(self, client, start: float, end: float) -> None:
        if client.index < self.timeline_limit:
            self.timeline.append((client.id, "online", start, end, "ok"))

    def _schedule_next_window(self, client, now: float) -> None:
        window = self.availability.next(client.id, client.window_cursor)
        if window is None:
            return
        start, end, client.window_cursor = window
        client.window_id += 1
        client.pending_end = end
        self.queue.push(start if start > now else now, WINDOW_OPEN, client.index, client.window_id)

    def window_handlers(self, lose: Callable) -> tuple[Callable[[int, int, float], bool], Callable[[int, int, float], bool]]:
        """(open_window, close_window): handlers of WINDOW_OPEN and WINDOW_CLOSE events, called as
        ``handler(client index, token, time)``; False for a stale event. ``lose(client, time)``
        is how a closing window ends the job of a busy client (the simulation owns jobs)."""
        clients = self.clients
        pool = self.pool
        in_pool, pool_items, pool_mask = pool.position, pool.items, pool.mask
        next_window = self.availability.next
        timeline, timeline_limit = self.timeline, self.timeline_limit
        queue = self.queue
        heap, buckets, keys, width = queue.heap, queue.buckets, queue.keys, queue.width
        next_sequence = queue.next_sequence
        heappush = heapq.heappush
        infinity = INF

        def open_window(index: int, token: int, time: float) -> bool:
            client = clients[index]
            if token != client.window_id:
                return False
            client.state = AVAILABLE
            client.window_start = time
            client.window_end = close = client.pending_end
            if in_pool[index] < 0:  # AvailablePool.add
                in_pool[index] = len(pool_items)
                pool_items.append(index)
                pool_mask[index] = 1
            if close < infinity:  # EventQueue.push, inlined (the hottest path of a long run)
                new = (close, next_sequence(), WINDOW_CLOSE, index, token)
                bucket = close // width
                if bucket <= queue.front:
                    heappush(heap, new)
                else:
                    waiting = buckets.get(bucket)
                    if waiting is None:
                        buckets[bucket] = [new]
                        heappush(keys, bucket)
                    else:
                        waiting.append(new)
            return True

        def close_window(index: int, token: int, time: float) -> bool:
            client = clients[index]
            if token != client.window_id:
                return False
            if client.state >= DOWNLOADING:  # busy: the job in progress is lost
                lose(client, time)
            start = client.window_start
            if start >= 0.0:
                client.available_seconds += time - start
                if index < timeline_limit:
                    timeline.append((client.id, "online", start, time, "ok"))
            client.window_start = -1.0
            client.state = IDLE
            where = in_pool[index]
            if where >= 0:  # AvailablePool.remove
                last = pool_items.pop()
                if last != index:
                    pool_items[where] = last
                    in_pool[last] = where
                in_pool[index] = -1
                pool_mask[index] = 0
            window = next_window(client.id, client.window_cursor)
            if window is not None:
                start, client.pending_end, client.window_cursor = window
                client.window_id = window_id = token + 1
                if start < time:
                    start = time
                new = (start, next_sequence(), WINDOW_OPEN, index, window_id)  # EventQueue.push, inlined
                bucket = start // width
                if bucket <= queue.front:
                    heappush(heap, new)
                else:
                    waiting = buckets.get(bucket)
                    if waiting is None:
                        buckets[bucket] = [new]
                        heappush(keys, bucket)
                    else:
                        waiting.append(new)
            return True

        return open_window, close_window
