"""The event loop: simulated devices move through IDLE -> AVAILABLE -> DOWNLOADING -> TRAINING ->
UPLOADING -> AVAILABLE while a paradigm (sync rounds, FedAsync, FedBuff, sequential) decides whom
to ask for work and what to do with what comes back.

The loop owns virtual time; a *backend* owns the federation (the real BaseServer and BaseClient
objects of :mod:`atoll.sim.realistic.backends`, or the cost-model-only dry run). A job is
- assigned: the client downloads what ``configure`` returned (its version is fixed now);
- trained when its download completes, for real, from that download; the result waits on the
  device until UPLOAD_DONE delivers it, or is lost if a window closes, the device drops out or the
  server cancels it first. A job that will certainly be cut before its training ends (its window,
  dropout or deadline comes first) is not trained at all: nothing it would compute could survive;
- accounted: seconds per phase, bytes moved, and lost work with its cause.

The run ends at the session end, after ``rounds`` server updates, at a target metric, when no
event is left, or at ``max_events``: it cannot spin forever, because every cycle either advances
virtual time (transfers, training, rejoin delays, windows) or counts a round.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from array import array
import time as wallclock
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from atoll.fl.base import AsyncRule
from atoll.seeding import numpy_rng
from atoll.sim.realistic.availability import Availability
from atoll.sim.realistic.cost import training_seconds, transfer_seconds
from atoll.sim.realistic.draws import Draws, gaussian, unit
from atoll.sim.realistic.events import ClientState, EventKind, EventQueue
from atoll.sim.realistic.presence import AvailabilityProcess

INF = math.inf
IDLE, AVAILABLE, DOWNLOADING, TRAINING, UPLOADING = (int(s) for s in ClientState)
(WINDOW_OPEN, WINDOW_CLOSE, DOWNLOAD_DONE, TRAINING_DONE, UPLOAD_DONE, DROPOUT, REJOIN, DEADLINE, SERVER_WAKE) = (int(k) for k in EventKind)
BUSY = (DOWNLOADING, TRAINING, UPLOADING)
PHASE_NAMES = {DOWNLOADING: "download", TRAINING: "train", UPLOADING: "upload"}


@dataclass
class Link:
    """A client's network: bandwidth medians (Mbit/s), log-normal sigmas, latency (s)."""

    down_median: float
    down_sigma: float
    up_median: float
    up_sigma: float
    latency: float


LOCAL_LINK = None  # the server's own pooled client moves no bytes


class SimClient:
    __slots__ = (
        "index",
        "id",
        "device",
        "network",
        "flops_per_second",
        "link",
        "rank",
        "pooled",
        "state",
        "token",
        "job",
        "window_start",
        "window_end",
        "available_seconds",
        "train_seconds",
        "transfer_seconds",
        "wasted_seconds",
        "jobs",
        "completed",
        "lost",
        "dropouts",
    )

    def __init__(
        self,
        index: int,
        client_id: int,
        device: str,
        network: str,
        flops_per_second: float,
        link: Link | None,
        rank: int,
        pooled: bool = False,
    ):
        self.index = index
        self.id = client_id
        self.device = device
        self.network = network
        self.flops_per_second = flops_per_second
        self.link = link
        self.rank = rank
        self.pooled = pooled
        self.state = IDLE
        self.token = 0  # changes whenever a job starts or ends: its pending events become stale
        self.job: Job | None = None
        self.window_start = -1.0  # start of the current online stretch (-1: not online)
        self.window_end = -INF  # end of the current window: also the token of its events
        self.available_seconds = 0.0
        self.train_seconds = 0.0
        self.transfer_seconds = 0.0
        self.wasted_seconds = 0.0
        self.jobs = 0
        self.completed = 0
        self.lost = 0
        self.dropouts = 0


class Job:
    __slots__ = (
        "client",
        "round",
        "version",
        "started",
        "phase_start",
        "download_seconds",
        "train_seconds",
        "upload_seconds",
        "bytes_down",
        "bytes_up",
        "payload",
        "result",
        "drop_at",
        "trained",
        "snapshot",
        "token",
        "trips",
    )

    def __init__(self, client: SimClient, round: int, version: int, started: float):
        self.client = client
        self.round = round
        self.version = version
        self.started = started
        self.phase_start = started
        self.download_seconds = 0.0
        self.train_seconds = 0.0
        self.upload_seconds = 0.0
        self.bytes_down = 0
        self.bytes_up = 0
        self.payload: Any = None
        self.result: Any = None
        self.drop_at = INF
        self.trained = False
        self.snapshot: Any = _NO_SNAPSHOT
        self.token = client.token
        self.trips = 0


_NO_SNAPSHOT = object()


@dataclass
class Totals:
    """Whole-run counters."""

    bytes_down: float = 0.0
    bytes_up: float = 0.0
    wasted_bytes: float = 0.0
    wasted_train_seconds: float = 0.0
    lost_jobs: Counter = field(default_factory=Counter)
    jobs_started: int = 0
    jobs_delivered: int = 0
    updates_aggregated: int = 0
    dropouts: int = 0
    staleness: Counter = field(default_factory=Counter)
    skipped: int = 0


class Simulation:
    """One realistic-mode run over ``clients`` (a list of :class:`SimClient`, index = position)."""

    def __init__(
        self,
        clients: list[SimClient],
        availability: Availability,
        backend,
        settings,
        *,
        seed: int,
        rounds: int,
        eval_every: int,
        dropout_probability: float = 0.0,
        rejoin_seconds: float = 1800.0,
        on_record: Callable[[dict], None] | None = None,
        record_timeline: int = 0,
        record_events: bool = False,
    ):
        self.clients = clients
        self.availability = availability
        self.backend = backend
        self.settings = settings
        self.seed = seed
        self.rounds = rounds
        self.eval_every = eval_every
        self.dropout = dropout_probability
        self.rejoin = rejoin_seconds
        self.on_record = on_record
        self.session_end = settings.session_hours * 3600.0
        self.draws = Draws(seed)
        self.queue = EventQueue()
        self.push = self.queue.push  # handlers push straight into the queue (no wrapper call)
        self.index_by_id = {c.id: c.index for c in clients}
        self.totals = Totals()
        self.now = 0.0
        self.events = 0
        self.stale_events = 0
        # a fingerprint of the timeline: see run()
        self.digest = hashlib.blake2b(digest_size=8)
        self.wake_pending = False
        self.done = False
        self.stopped_by = ""
        self.records: list[dict[str, Any]] = []
        self.timeline_limit = record_timeline
        self.timeline: list[tuple[int, str, float, float, str]] = []
        # presence (windows, pool, dropout and rejoin) is its own process feeding this loop
        self.presence = AvailabilityProcess(clients, availability, self.queue, rejoin_seconds, self.timeline, record_timeline)
        self.pool = self.presence.pool
        self.event_log: list[tuple[float, str, int]] | None = [] if record_events else None
        self.timing = not getattr(backend, "dry", False)  # dry backends do nothing worth timing
        self._base_down = self.draws.base("bandwidth-down")
        self._base_up = self.draws.base("bandwidth-up")
        self._base_dropout = self.draws.base("dropout")
        self._base_dropout_when = self.draws.base("dropout-when")
        self.wall: Counter = Counter()  # wall seconds spent inside the backend, by call
        self.loop_seconds = 0.0
        self.loop_cpu_seconds = 0.0
        self.backend_loop_seconds = 0.0
        self._bytes_at_record = (0.0, 0.0)
        self._wall_started = wallclock.perf_counter()
        self._wall_at_record = 0.0
        self.time_to_target: float | None = None
        self._evaluated_round = -1
        self.paradigm = make_paradigm(self, settings)

    # -- scheduling helpers -------------------------------------------------------------------------
    def push(self, time: float, kind: int, index: int = -1, token: int = 0) -> None:
        self.queue.push(time, kind, index, token)

    def request_wake(self) -> None:
        """Let the server look at who is available once the events of this instant are handled."""
        if not self.wake_pending and self.paradigm.wants_wake():
            self.wake_pending = True
            self.push(self.now, SERVER_WAKE, -1, 0)

    def _segment(self, client: SimClient, phase: str, start: float, end: float, outcome: str = "ok") -> None:
        if client.index < self.timeline_limit:
            self.timeline.append((client.id, phase, start, end, outcome))

    def _timed(self, what: str, fn, *args):
        started = wallclock.perf_counter()
        try:
            return fn(*args)
        finally:
            self.wall[what] += wallclock.perf_counter() - started

    # -- jobs -----------------------------------------------------------------------------------------
    def _transfer(self, client: SimClient, nbytes: int, median: float, sigma: float, base: int) -> float:
        """bytes * 8 / bandwidth + latency; bandwidth = median * exp(sigma * z), z drawn per job."""
        if sigma:
            z = gaussian(base, client.index, client.jobs)
            median *= math.exp(sigma * (3.0 if z > 3.0 else -3.0 if z < -3.0 else z))
        return transfer_seconds(nbytes, median, client.link.latency)

    def start_job(self, index: int, round: int, version: int) -> Job:
        """Assign work to an available client: it downloads now what the server configures now."""
        client = self.clients[index]
        now = self.now
        self.presence.busy(index)
        client.state = DOWNLOADING
        client.token = token = client.token + 1
        client.jobs = jobs = client.jobs + 1
        self.totals.jobs_started += 1
        job = Job(client, round, version, now)
        client.job = job
        backend = self.backend
        if self.timing:
            job.payload, job.bytes_down = self._timed("configure", backend.configure, round, client.id)
        else:
            job.payload, job.bytes_down = backend.configure(round, client.id)
        link = client.link
        if link is not None:
            job.download_seconds = self._transfer(client, job.bytes_down, link.down_median, link.down_sigma, self._base_down)
        tokens = backend.tokens(client.id, round)
        job.train_seconds = training_seconds(tokens, backend.flops_per_token(client.rank), client.flops_per_second)
        dropout = self.dropout
        if dropout and not client.pooled and unit(self._base_dropout, index, jobs) < dropout:
            job.drop_at = now + unit(self._base_dropout_when, index, jobs) * (job.download_seconds + job.train_seconds)
            self.push(job.drop_at, DROPOUT, index, token)
        self.push(now + job.download_seconds, DOWNLOAD_DONE, index, token)
        return job

    def cancel(self, job: Job, cause: str) -> None:
        """The server no longer wants this job (a straggler or past the deadline)."""
        client = job.client
        if client.job is not job:
            return
        self._lose(client, cause, notify=False)
        self.presence.idle(client)
        self.request_wake()

    def _lose(self, client: SimClient, cause: str, notify: bool = True) -> None:
        job = client.job
        now = self.now
        elapsed = now - job.phase_start
        totals = self.totals
        state = client.state
        if state == DOWNLOADING:
            fraction = min(1.0, elapsed / job.download_seconds) if job.download_seconds > 0 else 1.0
            totals.bytes_down += fraction * job.bytes_down
            totals.wasted_bytes += fraction * job.bytes_down
            client.transfer_seconds += elapsed
        elif state == TRAINING:
            totals.wasted_train_seconds += elapsed
            totals.wasted_bytes += job.bytes_down
            client.train_seconds += elapsed
            client.wasted_seconds += elapsed
            if job.trained and job.snapshot is not _NO_SNAPSHOT:
                self.backend.restore(client.id, job.snapshot)  # the device never finished: no private update
        elif state == UPLOADING:
            fraction = min(1.0, elapsed / job.upload_seconds) if job.upload_seconds > 0 else 1.0
            totals.wasted_train_seconds += job.train_seconds
            totals.bytes_up += fraction * job.bytes_up
            totals.wasted_bytes += job.bytes_down + fraction * job.bytes_up
            client.transfer_seconds += elapsed
            client.wasted_seconds += job.train_seconds
        self._segment(client, PHASE_NAMES.get(state, "?"), job.phase_start, now, cause)
        totals.lost_jobs[cause] += 1
        client.lost += 1
        client.token += 1
        client.job = None
        job.payload = job.result = None
        if notify:
            self.paradigm.lost(job, cause)
            self.request_wake()

    # -- event handlers (return False for a stale event) -----------------------------------------------
    def _on_download_done(self, index: int, token: int) -> bool:
        client = self.clients[index]
        if token != client.token:
            return False
        job = client.job
        now = self.now
        self.totals.bytes_down += job.bytes_down
        client.transfer_seconds += job.download_seconds
        if index < self.timeline_limit:
            self._segment(client, "download", job.phase_start, now)
        client.state = TRAINING
        job.phase_start = now
        training_end = now + job.train_seconds
        cutoff = job.drop_at if job.drop_at < client.window_end else client.window_end
        if self.session_end < cutoff:  # the session ends first: nothing computed would be delivered
            cutoff = self.session_end
        if self.paradigm.has_cutoff:
            cutoff = min(cutoff, self.paradigm.cutoff(job))
        if cutoff > training_end:  # ties go to the cut: its event was scheduled first
            if self.paradigm.may_cancel:
                job.snapshot = self.backend.snapshot(client.id)
            self._train(job)
        self.push(training_end, TRAINING_DONE, index, token)
        return True

    def _train(self, job: Job) -> None:
        if self.timing:
            job.result, job.bytes_up = self._timed("train", self.backend.train, job.round, job.client.id, job.payload)
        else:
            job.result, job.bytes_up = self.backend.train(job.round, job.client.id, job.payload)
        job.trips = self.backend.upload_trips(job.result)  # extra message round trips of protections
        job.trained = True

    def _on_training_done(self, index: int, token: int) -> bool:
        client = self.clients[index]
        if token != client.token:
            return False
        job = client.job
        now = self.now
        if not job.trained:  # cannot happen with consistent cutoffs; keep the run correct anyway
            self._train(job)
        job.snapshot = _NO_SNAPSHOT
        client.train_seconds += job.train_seconds
        if index < self.timeline_limit:
            self._segment(client, "train", job.phase_start, now)
        client.state = UPLOADING
        job.phase_start = now
        link = client.link
        if link is not None:
            job.upload_seconds = self._transfer(client, job.bytes_up, link.up_median, link.up_sigma, self._base_up)
            if job.trips:
                job.upload_seconds += 2.0 * job.trips * link.latency
        self.push(now + job.upload_seconds, UPLOAD_DONE, index, token)
        return True

    def _on_upload_done(self, index: int, token: int) -> bool:
        client = self.clients[index]
        if token != client.token:
            return False
        job = client.job
        self.totals.bytes_up += job.bytes_up
        self.totals.jobs_delivered += 1
        client.transfer_seconds += job.upload_seconds
        if index < self.timeline_limit:
            self._segment(client, "upload", job.phase_start, self.now)
        client.completed += 1
        client.token += 1
        client.job = None
        self.presence.idle(client)
        self.paradigm.delivered(job)
        self.request_wake()
        return True

    def _on_dropout(self, index: int, token: int) -> bool:
        client = self.clients[index]
        if token != client.token or client.state not in BUSY:
            return False
        self.totals.dropouts += 1
        client.dropouts += 1
        self.presence.going_offline(client, self.now)
        self._lose(client, "dropout")
        self.presence.offline(client, self.now)
        return True

    def _on_rejoin(self, index: int, token: int) -> bool:
        if not self.presence.rejoin(index, token, self.now):
            return False
        self.request_wake()
        return True

    def _on_deadline(self, index: int, token: int) -> bool:
        return self.paradigm.deadline(token)

    def _on_server_wake(self, index: int, token: int) -> bool:
        self.wake_pending = False
        self.paradigm.wake()
        return True

    # -- records --------------------------------------------------------------------------------------
    def complete_round(self, round: int, selected: list[int], delivered: list[Job], lost: int, staleness: list[int]) -> None:
        """A server update happened: write its record, evaluate when due, check the stop rules."""
        totals = self.totals
        totals.updates_aggregated += len(delivered)
        for value in staleness:
            totals.staleness[value] += 1
        down, up = self._bytes_at_record
        record: dict[str, Any] = {
            "round": round,
            "virtual_time": self.now,
            "virtual_hours": self.now / 3600.0,
            "clients": selected if len(selected) <= 100 else len(selected),
            "aggregated": [job.client.id for job in delivered] if len(delivered) <= 100 else len(delivered),
            "updates": len(delivered),
            "lost": lost,
            "bytes_down": int(round_half(totals.bytes_down - down)),
            "bytes_up": int(round_half(totals.bytes_up - up)),
        }
        self._bytes_at_record = (totals.bytes_down, totals.bytes_up)
        train = self._timed("summary", self.backend.train_summary, [job.result for job in delivered])
        if train:
            record["train"] = train
        record.update(self.backend.round_extras(round))
        if staleness:
            record["staleness"] = staleness if len(staleness) <= 100 else {"mean": float(np.mean(staleness)), "max": int(max(staleness))}
        if round % self.eval_every == 0 or round >= self.rounds:
            self._evaluate(record, final=round >= self.rounds)
        self._emit(record)
        if round >= self.rounds:
            self.stop("rounds")
        elif (reason := self.backend.stop_reason()) is not None:
            self.stop(reason)

    def _evaluate(self, record: dict[str, Any], final: bool) -> None:
        result = self._timed("evaluate", self.backend.evaluate, record["round"], final)
        record.update(result)
        self._evaluated_round = record["round"]
        metric, target = self.settings.target_metric, self.settings.target_value
        value = (record.get("global") or {}).get(metric) if metric else None
        if value is not None and self.time_to_target is None:
            lower = "loss" in metric or "perplexity" in metric
            if (value <= target) if lower else (value >= target):
                self.time_to_target = self.now
                record["target_reached"] = True
                self.stop("target")

    def _emit(self, record: dict[str, Any]) -> None:
        elapsed = wallclock.perf_counter() - self._wall_started
        record["wall_seconds"] = elapsed - self._wall_at_record
        self._wall_at_record = elapsed
        self.records.append(record)
        if self.on_record is not None:
            self._timed("output", self.on_record, record)

    def stop(self, reason: str) -> None:
        if not self.done:
            self.done = True
            self.stopped_by = reason

    # -- the loop -------------------------------------------------------------------------------------
    def _initial_schedule(self) -> None:
        self.presence.start()
        self.request_wake()

    def _lose_at(self, client: SimClient, time: float) -> None:
        """A closing window cuts the job of a busy client (called by the presence process)."""
        self.now = time
        self._lose(client, "window_close")

    def run(self) -> "Simulation":
        self._wall_started = wallclock.perf_counter()
        initial: dict[str, Any] = {"round": 0, "virtual_time": 0.0, "virtual_hours": 0.0, "bytes_up": 0, "bytes_down": 0}
        initial.update(self._timed("evaluate", self.backend.evaluate, 0, False))
        self._emit(initial)
        self._initial_schedule()
        handlers = [
            None,  # WINDOW_OPEN and WINDOW_CLOSE: the presence process's handlers, below
            None,
            self._on_download_done,
            self._on_training_done,
            self._on_upload_done,
            self._on_dropout,
            self._on_rejoin,
            self._on_deadline,
            self._on_server_wake,
        ]
        names = [kind.name for kind in EventKind]
        # Window openings and closings are nearly all the events of a long run: they come from the
        # queue's stream (never tuples), the presence process hands its two handlers over as
        # closures, and EventQueue.pop runs inlined over local names. Every other kind goes to its
        # handler method.
        open_window, close_window = self.presence.window_handlers(self._lose_at)
        clients = self.clients
        wants_wake = self.paradigm.wants_wake
        queue = self.queue
        heap = queue.heap
        next_sequence = queue.next_sequence
        pop, heappush = heapq.heappop, heapq.heappush
        end = self.session_end
        limit = self.settings.max_events
        log = self.event_log
        # the timeline digest: every handled job and server event's time and client*16+kind go
        # into two flat arrays, hashed an hour (one bucket) at a time together with the counts of
        # events popped and found stale so far. Window events enter only through those counts
        # (their times come from the availability model; one that changes a job shows in the
        # job's events), so the hottest path appends nothing.
        digest = self.digest
        times, keys_of = array("d"), array("q")
        time_of, key_of = times.append, keys_of.append
        events = self.events
        stale = 0
        opens, closes, wake = WINDOW_OPEN, WINDOW_CLOSE, SERVER_WAKE
        loop_started = wallclock.perf_counter()
        cpu_started = wallclock.process_time()
        backend_before = sum(self.wall.values())
        # EventQueue.pop's state, held locally: the open bucket's sorted run, and the stream of
        # window events (times, signed clients, window ends; sequence numbers from stream_base)
        run, position = queue.run, queue.position
        run_length = len(run)
        stream_times, stream_clients, stream_ends = queue.stream_times, queue.stream_clients, queue.stream_ends
        stream_base, stream_position = queue.stream_base, queue.stream_position
        stream_length = len(stream_times)
        time = last = self.now
        while not self.done:
            if events >= limit:
                self.stop("max_events")
                break
            # EventQueue.pop, inlined: the earliest of the run, the heap and the stream by (time,
            # sequence). Handlers only push, so the run and the stream cannot change under us.
            from_heap = False
            if position < run_length:
                item = run[position]
                if heap and heap[0] < item:
                    item, from_heap = heap[0], True
            elif heap:
                item, from_heap = heap[0], True
            else:
                item = None
            if stream_position < stream_length:
                time = stream_times[stream_position]
                if item is None or time < item[0] or (time == item[0] and stream_base + stream_position < item[1]):
                    # a window event: nearly all the events of a long run
                    if time > end:
                        self.now = end
                        self.stop("session")
                        break
                    index = stream_clients[stream_position]
                    token = stream_ends[stream_position]
                    stream_position += 1
                    events += 1
                    # self.now is kept for handlers: the window handlers set it only before calling out
                    if index < 0:  # a closing (~index)
                        index = ~index
                        if not close_window(index, token, time):
                            stale += 1
                            continue
                        kind = closes
                    else:
                        open_window(index, token, time)  # never stale: every window opens once
                        kind = opens
                        if not self.wake_pending:
                            self.now = time
                            if wants_wake():
                                self.wake_pending = True
                                heappush(heap, (time, next_sequence(), wake, -1, 0))  # now: the open bucket
                    last = time
                    if log is not None:
                        log.append((time, names[kind], clients[index].id))
                    continue
            if item is None:  # the run, the heap and the stream are exhausted: the next bucket opens
                digest.update(times)
                digest.update(keys_of)
                digest.update(array("q", (events, stale)))
                del times[:], keys_of[:]
                queue.position, queue.stream_position = position, stream_position
                if not queue.advance():
                    self.stop("no_events")
                    break
                run, position = queue.run, queue.position
                run_length = len(run)
                stream_times, stream_clients, stream_ends = queue.stream_times, queue.stream_clients, queue.stream_ends
                stream_base, stream_position = queue.stream_base, queue.stream_position
                stream_length = len(stream_times)
                continue
            if from_heap:
                pop(heap)
            else:
                position += 1
            time, _, kind, index, token = item
            if time > end:
                self.now = end
                self.stop("session")
                break
            events += 1
            self.now = time
            if not handlers[kind](index, token):
                stale += 1
                continue
            time_of(time)  # window events enter the digest through the counts only
            key_of(index * 16 + kind)
            last = time  # a handled event (stale ones continue above)
            if log is not None:
                log.append((time, names[kind], clients[index].id if index >= 0 else -1))
        digest.update(times)
        digest.update(keys_of)
        digest.update(array("q", (events, stale)))
        if self.stopped_by != "session":
            # the last handled event: a stale one popped after it (the upload of a job already
            # lost, say) changes nothing and must not stretch the run
            self.now = last
        queue.position, queue.stream_position = position, stream_position
        self.events = events
        self.stale_events += stale
        self.loop_seconds = wallclock.perf_counter() - loop_started
        self.loop_cpu_seconds = wallclock.process_time() - cpu_started
        self.backend_loop_seconds = sum(self.wall.values()) - backend_before
        self._finish()
        return self

    def _finish(self) -> None:
        now = self.now
        presence = self.presence
        for client in self.clients:
            presence.finish(client, now)
            if client.state in BUSY and client.job is not None:
                job = client.job
                self._segment(client, PHASE_NAMES[client.state], job.phase_start, now, "in_flight")
                if client.state == TRAINING:
                    client.train_seconds += now - job.phase_start
        last = self.records[-1]
        if last["round"] > 0 and self._evaluated_round != last["round"]:
            # the run stopped between evaluations: evaluate the state it ended with
            final: dict[str, Any] = {
                "round": last["round"],
                "final_evaluation": True,
                "virtual_time": now,
                "virtual_hours": now / 3600.0,
                "bytes_up": 0,
                "bytes_down": 0,
            }
            self._evaluate(final, final=True)
            self._emit(final)

    # -- summaries ------------------------------------------------------------------------------------
    @property
    def machinery_seconds(self) -> float:
        """Wall seconds of the event loop itself: the loop minus the backend calls made inside it."""
        return max(0.0, self.loop_seconds - self.backend_loop_seconds)

    def timeline_digest(self) -> str:
        return self.digest.hexdigest()


def round_half(value: float) -> float:
    return math.floor(value + 0.5)


# ---------------------------------------------------------------------------------------------
# paradigms


class ServerPort:
    """All a paradigm may do with the simulation: see who is available, start and cancel jobs,
    schedule its deadline, end a server update, and call the server (timed). Paradigms see
    nothing else of the loop, the queue or the presence process."""

    __slots__ = ("_sim", "_presence", "seed", "backend", "draws")

    def __init__(self, sim: "Simulation"):
        self._sim = sim
        self._presence = sim.presence
        self.seed = sim.seed
        self.backend = sim.backend
        self.draws = sim.draws

    @property
    def now(self) -> float:
        return self._sim.now

    @property
    def done(self) -> bool:
        return self._sim.done

    def available_count(self) -> int:
        return len(self._presence.pool)

    def available_ids(self) -> np.ndarray:
        """Sorted ids of online idle clients."""
        return self._presence.available_ids()

    def available_indices(self) -> list[int]:
        """Indices of online idle clients in the pool's (unsorted) order."""
        return self._presence.pool.items

    def pick_available(self, u: float) -> int:
        """The available client at uniform position ``u`` in [0, 1) of the pool."""
        return self._presence.pool.pick(u)

    def index_of(self, client_id: int) -> int | None:
        return self._sim.index_by_id.get(client_id)

    def is_available(self, index: int) -> bool:
        return self._presence.is_available(index)

    def start_job(self, index: int, round: int, version: int) -> Job:
        return self._sim.start_job(index, round, version)

    def cancel(self, job: Job, cause: str) -> None:
        self._sim.cancel(job, cause)

    def skip(self) -> None:
        """A chosen client could not be asked (busy, offline or unknown)."""
        self._sim.totals.skipped += 1

    def schedule_deadline(self, time: float, token: int) -> None:
        self._sim.push(time, DEADLINE, -1, token)

    def complete_round(self, round: int, selected: list[int], delivered: list[Job], lost: int, staleness: list[int]) -> None:
        self._sim.complete_round(round, selected, delivered, lost, staleness)

    def request_wake(self) -> None:
        self._sim.request_wake()

    def server_call(self, what: str, fn, *args):
        return self._sim._timed(what, fn, *args)


class Paradigm:
    may_cancel = False
    has_cutoff = False

    def __init__(self, sim: ServerPort, settings):
        self.sim = sim
        self.settings = settings
        self.backend = sim.backend

    def cutoff(self, job: Job) -> float:
        """The time at which the paradigm will certainly cancel ``job`` (INF: none planned)."""
        return INF

    def wants_wake(self) -> bool:
        """Whether the server would act on a change of availability now."""
        return True

    def wake(self) -> None: ...
    def delivered(self, job: Job) -> None: ...
    def lost(self, job: Job, cause: str) -> None: ...

    def deadline(self, token: int) -> bool:
        return False

    def server_call(self, what: str, fn, *args):
        return self.sim.server_call(what, fn, *args)


class SyncRounds(Paradigm):
    """Rounds: sample from the available clients, wait for all of them, for the first K (with
    over-selection), or until a deadline; aggregate what arrived; cancel the rest."""

    def __init__(self, sim: ServerPort, settings):
        super().__init__(sim, settings)
        self.sync = settings.sync
        self.may_cancel = self.sync.wait == "k_of_n"
        self.has_cutoff = self.sync.deadline_seconds is not None
        self.round = 1
        self.in_round = False
        self.active: dict[int, Job] = {}
        self.arrived: list[Job] = []
        self.selected: list[int] = []
        self.required = 0
        self.lost_count = 0
        self.deadline_at = INF

    def cutoff(self, job: Job) -> float:
        return self.deadline_at if job.round == self.round and self.in_round else INF

    def wants_wake(self) -> bool:
        return not self.in_round

    def wake(self) -> None:
        sim = self.sim
        if self.in_round or sim.done or sim.available_count() < self.sync.min_clients:
            return  # (the O(1) count first: every window opening wakes an idle server)
        available = sim.available_ids()
        chosen = [int(c) for c in self.server_call("sample", self.backend.sample, self.round, available)]
        if not chosen:
            return
        required = len(chosen)
        if self.sync.wait == "k_of_n" and self.sync.over_selection > 0:
            extra = math.ceil(required * self.sync.over_selection - 1e-9)
            rest = np.setdiff1d(available, np.asarray(chosen, dtype=np.int64))
            if extra and len(rest):
                picked = numpy_rng(sim.seed, "over-selection", self.round).choice(len(rest), size=min(extra, len(rest)), replace=False)
                chosen = sorted(chosen + [int(rest[i]) for i in picked])
        if self.sync.wait != "k_of_n":
            required = len(chosen)
        self.in_round = True
        self.selected = chosen
        self.required = required
        self.arrived = []
        self.lost_count = 0
        if self.sync.deadline_seconds is not None:
            self.deadline_at = sim.now + self.sync.deadline_seconds
            sim.schedule_deadline(self.deadline_at, self.round)
        for client_id in chosen:
            index = sim.index_of(client_id)
            if index is None or not sim.is_available(index):  # a sampler returning a busy or unknown id
                sim.skip()
                continue
            job = sim.start_job(index, self.round, self.round - 1)
            self.active[job.client.index] = job
        if not self.active:
            self.finish("straggler")

    def delivered(self, job: Job) -> None:
        self.active.pop(job.client.index, None)
        self.arrived.append(job)
        if len(self.arrived) >= self.required or not self.active:
            self.finish("straggler")

    def lost(self, job: Job, cause: str) -> None:
        self.active.pop(job.client.index, None)
        self.lost_count += 1
        if not self.active:
            self.finish("straggler")

    def deadline(self, token: int) -> bool:
        if not self.in_round or token != self.round:
            return False
        self.finish("deadline")
        return True

    def finish(self, cause: str) -> None:
        sim = self.sim
        self.in_round = False
        self.deadline_at = INF
        cancelled = list(self.active.values())
        self.active = {}
        for job in cancelled:
            sim.cancel(job, cause)
        arrived = sorted(self.arrived, key=lambda j: j.client.id)
        if arrived:
            self.server_call("aggregate", self.backend.aggregate, self.round, [job.result for job in arrived])
        sim.complete_round(self.round, self.selected, arrived, self.lost_count + len(cancelled), [0] * len(arrived))
        self.round += 1
        sim.request_wake()


class AsyncUpdates(Paradigm):
    """FedAsync (one update at a time) or FedBuff (K at a time): ``concurrency`` clients work at
    once; a free slot goes to a uniformly drawn available client, which downloads the current
    version. Staleness = server updates since that download."""

    def __init__(self, sim: ServerPort, settings, clients: int, sample_rate: float):
        super().__init__(sim, settings)
        self.buffered = settings.paradigm == "fedbuff"
        self.rule = AsyncRule(
            alpha=settings.fedasync.alpha,
            staleness=settings.staleness.kind,
            a=settings.staleness.a,
            b=settings.staleness.b,
            server_lr=settings.fedbuff.server_lr,
        )
        self.concurrency = settings.concurrency or max(1, math.ceil(sample_rate * clients - 1e-9))
        self.version = 0
        self.active = 0
        self.picks = 0
        self.buffer: list[Job] = []
        self.lost_count = 0
        self.delivered_from: dict[int, int] = {}
        self._pick_base = sim.draws.base("async-pick")

    def wants_wake(self) -> bool:
        return self.active < self.concurrency

    def wake(self) -> None:
        sim = self.sim
        while self.active < self.concurrency and sim.available_count() and not sim.done:
            u = unit(self._pick_base, 0, self.picks)
            self.picks += 1
            index = sim.pick_available(u)
            if self.buffered and self.delivered_from.get(index) == self.version:
                # FedBuff: one update per client per server version (a second job from the same
                # version and seed would repeat the first); draw among the others
                others = [i for i in sim.available_indices() if self.delivered_from.get(i) != self.version]
                if not others:
                    break
                index = others[int(u * len(others))]
            sim.start_job(index, self.version + 1, self.version)
            self.active += 1

    def delivered(self, job: Job) -> None:
        self.active -= 1
        self.delivered_from[job.client.index] = job.version
        if self.buffered:
            self.buffer.append(job)
            if len(self.buffer) < self.settings.fedbuff.buffer:
                return
            jobs, self.buffer = self.buffer, []
        else:
            jobs = [job]
        staleness = [self.version - j.version for j in jobs]
        version = self.version + 1
        if self.buffered:
            self.server_call(
                "aggregate",
                self.backend.aggregate_buffered,
                version,
                [j.result for j in jobs],
                staleness,
                [j.payload for j in jobs],
                self.rule,
            )
        else:
            self.server_call("aggregate", self.backend.aggregate_async, version, job.result, staleness[0], self.rule)
        self.version = version
        lost, self.lost_count = self.lost_count, 0
        self.sim.complete_round(version, [j.client.id for j in jobs], jobs, lost, staleness)
        for j in jobs:
            j.payload = j.result = None

    def lost(self, job: Job, cause: str) -> None:
        self.active -= 1
        self.lost_count += 1


class SequentialPasses(Paradigm):
    """The adapter passes from client to client: a pass samples a cohort, orders it at random, and
    hands the current global adapter to each member in turn (through the server); each delivered
    update becomes the global adapter (``aggregate`` of one update). Members offline at their turn
    are skipped; lost work leaves the adapter as it was."""

    def __init__(self, sim: ServerPort, settings):
        super().__init__(sim, settings)
        self.round = 1
        self.in_pass = False
        self.order: list[int] = []
        self.current: Job | None = None
        self.hops = 0
        self.arrived: list[Job] = []
        self.selected: list[int] = []
        self.lost_count = 0

    def wants_wake(self) -> bool:
        return not self.in_pass

    def wake(self) -> None:
        sim = self.sim
        if sim.done or self.current is not None:
            return
        if not self.in_pass:
            available = sim.available_ids()
            if len(available) == 0:
                return
            chosen = [int(c) for c in self.server_call("sample", self.backend.sample, self.round, available)]
            if not chosen:
                return
            order = numpy_rng(sim.seed, "sequential-order", self.round).permutation(len(chosen))
            self.selected = chosen
            self.order = [chosen[i] for i in order]
            self.in_pass = True
            self.arrived = []
            self.lost_count = 0
        self._next()

    def _next(self) -> None:
        sim = self.sim
        while self.order:
            client_id = self.order.pop(0)
            index = sim.index_of(client_id)
            if sim.is_available(index):
                self.current = sim.start_job(index, self.round, self.hops)
                return
            sim.skip()
        self._finish()

    def delivered(self, job: Job) -> None:
        self.current = None
        self.server_call("aggregate", self.backend.aggregate, self.round, [job.result])
        self.hops += 1
        self.arrived.append(job)
        job.payload = None
        self._next()

    def lost(self, job: Job, cause: str) -> None:
        self.current = None
        self.lost_count += 1
        self._next()

    def _finish(self) -> None:
        self.in_pass = False
        self.sim.complete_round(self.round, self.selected, self.arrived, self.lost_count, [0] * len(self.arrived))
        self.round += 1
        self.sim.request_wake()


def make_paradigm(sim: Simulation, settings) -> Paradigm:
    """The paradigm of ``settings``, talking to ``sim`` through a :class:`ServerPort` only."""
    port = ServerPort(sim)
    if settings.paradigm == "sync":
        return SyncRounds(port, settings)
    if settings.paradigm in ("fedasync", "fedbuff"):
        real = [c for c in sim.clients if not c.pooled]
        return AsyncUpdates(port, settings, len(real), sim.backend.sample_rate)
    return SequentialPasses(port, settings)
