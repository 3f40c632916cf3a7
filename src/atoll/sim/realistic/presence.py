"""Who is online: the availability process that feeds the event simulation.

:class:`AvailabilityProcess` owns everything about presence: each client's windows (from an
:class:`~atoll.sim.realistic.availability.Availability` model: always on, daily windows or a
trace), the pool of online idle clients, going offline on a dropout and rejoining later, and the
online-time accounting. It feeds its own events (WINDOW_OPEN, WINDOW_CLOSE, REJOIN) into the
simulation's queue and handles them; the simulation handles jobs and the server.

Window events are nearly all the events of a long run (one opening and one closing per device per
day, against a handful per job), so they cost as little as possible twice over. They are made in
bulk: the process is the queue's *source* (see :mod:`atoll.sim.realistic.events`). It reads every
client's windows of a chunk (a day) at once from the availability model as arrays, sorts their
openings and closings by time (closings before openings at one time, then by start and client),
and hands them to the queue an hour at a time (:meth:`AvailabilityProcess.release`) as arrays that
never become per-event tuples. And they are handled by two closures over local names
(:meth:`AvailabilityProcess.window_handlers`) that the event loop calls directly: an opening or a
closing touches its client and the pool and pushes nothing. They are the only code for window
events. A window event's token is the window's end time, which tells a client's windows apart
(they never overlap) and is what a rejoin after a dropout checks against.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from atoll.sim.realistic.availability import Availability
from atoll.sim.realistic.events import ClientState, EventKind, EventQueue

INF = math.inf
_NOTHING = (np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0))
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

    A client's presence fields (``window_start``, ``window_end``, ``available_seconds``) are
    written only here. ``timeline`` receives the "online" segments of clients with index <
    ``timeline_limit``. ``next_time`` and ``release`` make it the queue's source of window events."""

    def __init__(self, clients, availability: Availability, queue: EventQueue, rejoin_seconds: float, timeline: list, timeline_limit: int):
        self.clients = clients
        self.availability = availability
        self.queue = queue
        self.rejoin_seconds = rejoin_seconds
        self.timeline = timeline
        self.timeline_limit = timeline_limit
        self.pool = AvailablePool(len(clients))
        self.next_time = INF  # the earliest an unreleased window event can be (the queue source's bound)
        self.chunk = 0
        self._chunk_bound = INF
        self._pending: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # read, not yet released
        self._ids = np.zeros(0, dtype=np.int64)
        self._index_of_id = np.zeros(0, dtype=np.int64)

    # -- the start and the end of a run ---------------------------------------------------------------
    def start(self) -> None:
        """Every client's first window (always-on clients are online from time 0)."""
        always = self.availability.always_on
        members = []
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
                members.append(client)
        if not members:
            return
        self._ids = np.array([client.id for client in members], dtype=np.int64)
        self._index_of_id = np.full(int(self._ids.max()) + 1, -1, dtype=np.int64)
        self._index_of_id[self._ids] = [client.index for client in members]
        self.chunk = 0
        self._chunk_bound = self.availability.chunk_start(0)
        self.next_time = self._chunk_bound
        self.queue.attach(self)

    def release(self, until: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every window event before ``until`` not given yet, as arrays (times, signed clients,
        ends) sorted by time: a client's index for an opening, ``~index`` for a closing. Reads
        chunks from the availability model until none can hold an event before ``until``."""
        availability = self.availability
        pending = self._pending
        while self._chunk_bound < until:
            ids, starts, ends = availability.windows_of_chunk(self.chunk, self._ids)
            self.chunk += 1
            self._chunk_bound = availability.chunk_start(self.chunk)
            if not len(ids):
                continue
            # by start (equal starts by client), then closings before openings at one time: the
            # second sort is nearly free (closings of daily windows come in the order of starts)
            by_start = np.argsort(starts, kind="stable")
            index, starts, ends = self._index_of_id[ids][by_start], starts[by_start], ends[by_start]
            closes = np.isfinite(ends)  # a window that never ends has no closing
            times = np.concatenate((ends[closes], starts))
            clients = np.concatenate((~index[closes], index))
            tokens = np.concatenate((ends[closes], ends))
            if pending is not None:  # events read earlier and not released come first at equal times
                times = np.concatenate((pending[0], times))
                clients = np.concatenate((pending[1], clients))
                tokens = np.concatenate((pending[2], tokens))
            order = np.argsort(times, kind="stable")
            pending = (times[order], clients[order], tokens[order])
        if pending is None:
            self._pending = None
            self.next_time = self._chunk_bound
            return _NOTHING
        cut = int(np.searchsorted(pending[0], until, side="left"))
        released = (pending[0][:cut], pending[1][:cut], pending[2][:cut])
        self._pending = (pending[0][cut:], pending[1][cut:], pending[2][cut:]) if cut < len(pending[0]) else None
        first_pending = float(self._pending[0][0]) if self._pending is not None else INF
        self.next_time = min(first_pending, self._chunk_bound)
        return released

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
            self.queue.push(now + self.rejoin_seconds, REJOIN, client.index, client.window_end)

    def rejoin(self, index: int, token: float, now: float) -> bool:
        """A dropped device is back (False: the event is stale)."""
        client = self.clients[index]
        if token != client.window_end or client.state != IDLE or now >= token:
            return False
        client.state = AVAILABLE
        client.window_start = now
        self.pool.add(index)
        return True

    # -- windows ----------------------------------------------------------------------------------------
    def _segment(self, client, start: float, end: float) -> None:
        if client.index < self.timeline_limit:
            self.timeline.append((client.id, "online", start, end, "ok"))

    def window_handlers(self, lose: Callable) -> tuple[Callable[[int, float, float], bool], Callable[[int, float, float], bool]]:
        """(open_window, close_window): handlers of WINDOW_OPEN and WINDOW_CLOSE events, called as
        ``handler(client index, token, time)``; False for a stale event. ``lose(client, time)``
        is how a closing window ends the job of a busy client (the simulation owns jobs)."""
        clients = self.clients
        pool = self.pool
        in_pool, pool_items, pool_mask = pool.position, pool.items, pool.mask
        timeline, timeline_limit = self.timeline, self.timeline_limit

        def open_window(index: int, token: float, time: float) -> bool:
            client = clients[index]
            client.state = AVAILABLE
            client.window_start = time
            client.window_end = token  # the token is the window's end
            if in_pool[index] < 0:  # AvailablePool.add
                in_pool[index] = len(pool_items)
                pool_items.append(index)
                pool_mask[index] = 1
            return True

        def close_window(index: int, token: float, time: float) -> bool:
            client = clients[index]
            if token != client.window_end:
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
            return True

        return open_window, close_window
