"""Hand-computed timelines of the realistic event loop (dry runs: the cost model, no training).

Every case uses round numbers: one job moves 1,000 bytes each way at 0.008 Mbit/s plus 0.5 s
latency (1.5 s per transfer) and trains 100 tokens at 2,500 FLOPs/token (4 * 250 frozen + 6 * 250
trained parameters), i.e. 250,000 FLOPs: 10 s on a 2.5e-8 TFLOP/s "fast" device, 20 s "mid",
40 s "slow", 80 s "crawl".
"""

from __future__ import annotations

import math

import pytest
import yaml

from atoll.config import config_with
from atoll.resolve import resolve
from atoll.seeding import numpy_rng
from atoll.sim.realistic.backends import DryBackend
from atoll.sim.realistic.draws import Draws
from atoll.sim.realistic.events import EventKind, EventQueue
from atoll.sim.realistic.runner import build_simulation, dry_backend

TRANSFER = 1.5
TRAIN = {"fast": 10.0, "mid": 20.0, "slow": 40.0, "crawl": 80.0}


def lab_system(devices: list[str], availability: dict | None = None) -> dict:
    return {
        "devices": {
            "mix": {"fast": 1},
            "clients": dict(enumerate(devices)),
            "profiles": {
                "fast": {"tflops": 2.5e-8, "memory_gb": 1},
                "mid": {"tflops": 1.25e-8, "memory_gb": 1},
                "slow": {"tflops": 6.25e-9, "memory_gb": 1},
                "crawl": {"tflops": 3.125e-9, "memory_gb": 1},
            },
        },
        "networks": {"mix": {"lab": 1}, "profiles": {"lab": {"down_mbps": 0.008, "up_mbps": 0.008, "latency_ms": 500}}},
        "availability": availability or {"windows": "always"},
        "workload": {
            "examples": 10,
            "tokens_per_example": 10,
            "model_parameters": 250,
            "lora_parameters_per_rank": 0,
            "extra_parameters": 250,
        },
    }


class RecordingBackend(DryBackend):
    """A dry backend that remembers what the loop asked of it."""

    def __init__(self, base: DryBackend):
        self.__dict__.update(base.__dict__)
        self.trained: list[tuple[int, int]] = []
        self.restored: list[int] = []
        self.aggregated: list[tuple] = []

    def train(self, round, client_id, download):
        self.trained.append((round, client_id))
        return ("update", client_id), super().train(round, client_id, download)[1]

    def snapshot(self, client_id):
        return ("snapshot", client_id)

    def restore(self, client_id, snapshot):
        assert snapshot == ("snapshot", client_id)
        self.restored.append(client_id)

    def aggregate(self, round, updates):
        self.aggregated.append(("sync", round, [u[1] for u in updates]))

    def aggregate_async(self, version, update, staleness, rule):
        self.aggregated.append(("fedasync", version, update[1], staleness, rule.weight(staleness)))

    def aggregate_buffered(self, version, updates, staleness, starts, rule):
        self.aggregated.append(("fedbuff", version, [u[1] for u in updates], list(staleness)))


def make_sim(tmp_path, system: dict, **overrides):
    path = tmp_path / "sys.yaml"
    path.write_text(yaml.safe_dump(system))
    values = {
        "mode": "realistic",
        "system": str(path),
        "realistic.dry_run": "true",
        "model.name": "tiny-bert",
        "federation.clients": len(system["devices"]["clients"]),
        "federation.rounds": 2,
        "federation.sample_rate": 1.0,
        "train.local_steps": 1,
        "train.batch_size": 10,
        "run.root": str(tmp_path / "runs"),
    }
    values.update(overrides)
    run = resolve(config_with([f"{k}={v}" for k, v in values.items()]))
    config, spec, fleet = run.config, run.system, run.fleet
    backend = RecordingBackend(dry_backend(config, spec, fleet))
    return build_simulation(config, spec, fleet, backend, record_events=True), backend


def events(sim, kinds=None):
    return [(pytest.approx(t, abs=1e-9), k, c) for t, k, c in sim.event_log if kinds is None or k in kinds]


def test_queue_orders_by_time_then_by_scheduling_order():
    queue = EventQueue()
    queue.push(5.0, EventKind.UPLOAD_DONE, 1)
    queue.push(1.0, EventKind.WINDOW_OPEN, 2)
    queue.push(5.0, EventKind.WINDOW_CLOSE, 0)  # same time, scheduled later: pops later
    queue.push(1.0, EventKind.DROPOUT, 9)
    popped = [queue.pop() for _ in range(len(queue))]
    assert [(t, k, c) for t, _, k, c, _ in popped] == [
        (1.0, EventKind.WINDOW_OPEN, 2),
        (1.0, EventKind.DROPOUT, 9),
        (5.0, EventKind.UPLOAD_DONE, 1),
        (5.0, EventKind.WINDOW_CLOSE, 0),
    ]


def test_three_clients_event_order_and_finish_times_are_exact(tmp_path):
    sim, backend = make_sim(tmp_path, lab_system(["fast", "mid", "slow"]))
    sim.run()
    d, t, u = "DOWNLOAD_DONE", "TRAINING_DONE", "UPLOAD_DONE"
    expected = [(0.0, "SERVER_WAKE", -1)]
    for start in (0.0, 43.0):  # round 1 at 0 s; round 2 when the slowest upload lands at 43 s
        expected += [(start + 1.5, d, 0), (start + 1.5, d, 1), (start + 1.5, d, 2)]
        expected += [
            (start + 11.5, t, 0),
            (start + 13.0, u, 0),
            (start + 21.5, t, 1),
            (start + 23.0, u, 1),
            (start + 41.5, t, 2),
            (start + 43.0, u, 2),
        ]
        if start == 0.0:
            expected.append((43.0, "SERVER_WAKE", -1))
    assert events(sim) == expected
    assert [(r["round"], r["virtual_time"], r["aggregated"]) for r in sim.records[1:]] == [(1, 43.0, [0, 1, 2]), (2, 86.0, [0, 1, 2])]
    assert sim.stopped_by == "rounds" and sim.now == 86.0
    assert [c.train_seconds for c in sim.clients] == pytest.approx([20.0, 40.0, 80.0])
    assert [c.transfer_seconds for c in sim.clients] == pytest.approx([4 * TRANSFER] * 3)
    assert sim.totals.bytes_down == sim.totals.bytes_up == 6 * 1000
    assert backend.trained == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert backend.aggregated == [("sync", 1, [0, 1, 2]), ("sync", 2, [0, 1, 2])]
    assert sum(sim.totals.lost_jobs.values()) == 0


def test_a_closing_window_loses_the_work_in_progress(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("client,start,end\n0,0,20\n0,100,300\n")
    system = lab_system(["slow"], {"windows": "trace", "trace": {"path": str(trace)}})
    sim, backend = make_sim(tmp_path, system)
    sim.run()
    # job 1: download 0-1.5, training would end at 41.5 but the window closes at 20
    assert events(sim, {"WINDOW_OPEN", "WINDOW_CLOSE", "UPLOAD_DONE"}) == [
        (0.0, "WINDOW_OPEN", 0),
        (20.0, "WINDOW_CLOSE", 0),
        (100.0, "WINDOW_OPEN", 0),
        (143.0, "UPLOAD_DONE", 0),
    ]
    assert dict(sim.totals.lost_jobs) == {"window_close": 1}
    assert sim.totals.wasted_train_seconds == pytest.approx(20.0 - 1.5)
    assert sim.totals.wasted_bytes == 1000
    assert backend.trained == [(2, 0)], "work that cannot survive is not trained"
    assert [(r["round"], r["updates"], r["lost"]) for r in sim.records[1:]] == [(1, 0, 1), (2, 1, 0)]
    assert sim.clients[0].available_seconds == pytest.approx(20.0 + 43.0)
    assert (0, "train", 1.5, 20.0, "window_close") in sim.timeline


def test_dropout_loses_the_job_and_the_device_rejoins_later(tmp_path):
    system = lab_system(["fast"], {"windows": "always", "dropout": {"probability": 1.0, "rejoin_minutes": 1}})
    sim, backend = make_sim(tmp_path, system, **{"federation.rounds": 1000, "realistic.session_hours": 0.1})
    sim.run()
    draws = Draws(sim.seed)
    span = TRANSFER + TRAIN["fast"]
    first_drop = draws.uniform("dropout-when", 0, 1) * span
    second_start = first_drop + 60.0
    second_drop = second_start + draws.uniform("dropout-when", 0, 2) * span
    dropouts = events(sim, {"DROPOUT", "REJOIN"})
    assert dropouts[:3] == [(first_drop, "DROPOUT", 0), (second_start, "REJOIN", 0), (second_drop, "DROPOUT", 0)]
    assert backend.trained == [] and sim.totals.jobs_delivered == 0
    assert sim.totals.dropouts == sim.totals.lost_jobs["dropout"] == sim.clients[0].jobs
    assert sim.stopped_by == "session" and sim.now == pytest.approx(360.0)
    # wasted training is the part of each job between download end and the drop
    cut = [seg for seg in sim.timeline if seg[1] == "train" and seg[4] == "dropout"]
    assert cut and sim.totals.wasted_train_seconds == pytest.approx(sum(seg[3] - seg[2] for seg in cut))
    assert all(r["updates"] == 0 for r in sim.records[1:])


def test_a_deadline_keeps_the_clients_that_made_it(tmp_path):
    sim, backend = make_sim(
        tmp_path,
        lab_system(["fast", "mid", "slow"]),
        **{"federation.rounds": 1, "realistic.sync.wait": "deadline", "realistic.sync.deadline_seconds": 30},
    )
    sim.run()
    record = sim.records[1]
    assert record["virtual_time"] == 30.0 and record["aggregated"] == [0, 1] and record["lost"] == 1
    assert dict(sim.totals.lost_jobs) == {"deadline": 1}
    assert backend.trained == [(1, 0), (1, 1)], "the slow client could not finish by the deadline"
    assert events(sim, {"DEADLINE"}) == [(30.0, "DEADLINE", -1)]


def test_k_of_n_with_over_selection_aggregates_the_first_k_and_cancels_the_rest(tmp_path):
    sim, backend = make_sim(
        tmp_path,
        lab_system(["fast", "mid", "slow", "crawl"]),
        **{"federation.rounds": 1, "federation.sample_rate": 0.5, "realistic.sync.wait": "k_of_n", "realistic.sync.over_selection": 1.0},
    )
    sim.run()
    record = sim.records[1]
    assert record["clients"] == [0, 1, 2, 3], "K = 2 plus 100 % over-selection"
    assert record["aggregated"] == [0, 1] and record["virtual_time"] == 23.0
    assert dict(sim.totals.lost_jobs) == {"straggler": 2}
    # the stragglers were training when cancelled: their private state is restored
    assert sorted(backend.restored) == [2, 3]
    assert sim.totals.wasted_train_seconds == pytest.approx(2 * (23.0 - 1.5))


def test_k_of_n_without_over_selection_waits_for_the_sampled_clients(tmp_path):
    sim, backend = make_sim(
        tmp_path,
        lab_system(["fast", "mid", "slow", "crawl"]),
        **{"federation.rounds": 1, "federation.sample_rate": 0.5, "realistic.sync.wait": "k_of_n"},
    )
    sim.run()
    record = sim.records[1]
    assert len(record["clients"]) == 2 and record["aggregated"] == record["clients"]
    slowest = max(TRAIN[["fast", "mid", "slow", "crawl"][c]] for c in record["clients"])
    assert record["virtual_time"] == pytest.approx(slowest + 2 * TRANSFER)


def test_fedasync_staleness_counts_server_updates_since_download(tmp_path):
    sim, backend = make_sim(
        tmp_path,
        lab_system(["fast", "slow"]),
        **{
            "federation.rounds": 4,
            "realistic.paradigm": "fedasync",
            "realistic.staleness.kind": "polynomial",
            "realistic.staleness.a": 0.5,
        },
    )
    sim.run()
    # the fast client delivers at 13, 26, 39 (staleness 0); the slow one at 43 after 3 updates
    assert backend.aggregated == [
        ("fedasync", 1, 0, 0, 1.0),
        ("fedasync", 2, 0, 0, 1.0),
        ("fedasync", 3, 0, 0, 1.0),
        ("fedasync", 4, 1, 3, pytest.approx(0.5)),
    ]
    assert [r["virtual_time"] for r in sim.records[1:]] == [13.0, 26.0, 39.0, 43.0]
    assert dict(sim.totals.staleness) == {0: 3, 3: 1}


def test_fedbuff_aggregates_buffers_of_k_with_their_staleness(tmp_path):
    sim, backend = make_sim(
        tmp_path,
        lab_system(["fast", "mid", "crawl"]),
        **{"federation.rounds": 4, "realistic.paradigm": "fedbuff", "realistic.fedbuff.buffer": 2},
    )
    sim.run()
    # fast and mid fill buffers at 23, 46 and 69 (a client waits for the next version after
    # delivering: one update per client per version); at 83 the fast client's update (version 3)
    # and the crawling client's (version 0, staleness 3) fill the fourth buffer
    assert backend.aggregated == [
        ("fedbuff", 1, [0, 1], [0, 0]),
        ("fedbuff", 2, [0, 1], [0, 0]),
        ("fedbuff", 3, [0, 1], [0, 0]),
        ("fedbuff", 4, [0, 2], [0, 3]),
    ]
    assert [r["virtual_time"] for r in sim.records[1:]] == [23.0, 46.0, 69.0, 83.0]


def test_fedbuff_never_takes_two_updates_of_one_client_from_one_version(tmp_path):
    sim, backend = make_sim(
        tmp_path,
        lab_system(["fast", "crawl", "crawl"]),
        **{"federation.rounds": 3, "realistic.paradigm": "fedbuff", "realistic.fedbuff.buffer": 2, "realistic.concurrency": 3},
    )
    sim.run()
    for _, _, clients, _ in backend.aggregated:
        assert len(set(clients)) == len(clients)
    with pytest.raises(Exception, match="exceeds the 3 clients"):
        make_sim(tmp_path, lab_system(["fast", "crawl", "crawl"]), **{"realistic.paradigm": "fedbuff", "realistic.fedbuff.buffer": 4})


def test_sequential_passes_the_adapter_from_client_to_client(tmp_path):
    sim, backend = make_sim(tmp_path, lab_system(["fast", "mid", "slow"]), **{"federation.rounds": 1, "realistic.paradigm": "sequential"})
    sim.run()
    # every hop aggregates exactly one update, in the pass's seeded order
    permutation = numpy_rng(sim.seed, "sequential-order", 1).permutation(3)
    order = [int(c) for c in permutation]
    assert backend.aggregated == [("sync", 1, [client]) for client in order]
    # one client at a time: each starts when the previous upload landed
    uploads = [t for t, k, c in sim.event_log if k == "UPLOAD_DONE"]
    expected, clock = [], 0.0
    for client in order:
        clock += 2 * TRANSFER + TRAIN[["fast", "mid", "slow"][client]]
        expected.append(clock)
    assert uploads == pytest.approx(expected)
    downloads = [(t, c) for t, k, c in sim.event_log if k == "DOWNLOAD_DONE"]
    assert [c for _, c in downloads] == order


def test_a_federation_with_no_availability_ends_instead_of_spinning(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("client,start,end\n5,0,10\n")  # only a client id the federation does not have
    sim, _ = make_sim(tmp_path, lab_system(["fast"], {"windows": "trace", "trace": {"path": str(trace)}}))
    sim.run()
    assert sim.stopped_by == "no_events" and len(sim.records) == 1


def phone_week(tmp_path, folder: str, seed: int = 0, tokens: int = 32, **overrides):
    """60 phones with daily windows and dropout: a dry run whose timeline exercises every event kind."""
    system = {
        "devices": {"mix": {"flagship-phone": 1, "budget-phone": 2}, "speed_sigma": 0.3},
        "networks": {"mix": {"wifi": 2, "4g": 1}},
        "availability": {
            "windows": "daily",
            "daily": {"start_hour": 1, "hours": 6, "jitter_hours": 1, "presence": 0.8},
            "dropout": {"probability": 0.2, "rejoin_minutes": 10},
        },
        "workload": {"examples": {"median": 100, "sigma": 1.0}, "tokens_per_example": tokens},
    }
    (tmp_path / folder).mkdir()
    path = tmp_path / folder / "sys.yaml"
    path.write_text(yaml.safe_dump(system))
    values = {
        "mode": "realistic",
        "system": str(path),
        "realistic.dry_run": "true",
        "model.name": "tiny-bert",
        "seed": seed,
        "federation.clients": 60,
        "federation.rounds": 500,
        "federation.sample_rate": 0.1,
        "realistic.session_hours": 30,
        "realistic.sync.wait": "deadline",
        "realistic.sync.deadline_seconds": 120,
        "run.root": str(tmp_path / folder),
    }
    values.update(overrides)
    run = resolve(config_with([f"{k}={v}" for k, v in values.items()]))
    config, spec, fleet = run.config, run.system, run.fleet
    return build_simulation(config, spec, fleet, dry_backend(config, spec, fleet), record_events=True)


def test_the_same_seed_gives_the_same_timeline_and_another_seed_does_not(tmp_path):
    first, second, other = (phone_week(tmp_path, folder, seed).run() for seed, folder in ((0, "a"), (0, "b"), (1, "c")))
    assert first.events > 1000 and first.totals.dropouts > 0
    assert first.event_log == second.event_log and first.timeline == second.timeline
    assert first.timeline_digest() == second.timeline_digest()
    assert [r["virtual_time"] for r in first.records] == [r["virtual_time"] for r in second.records]
    assert first.event_log != other.event_log and first.timeline_digest() != other.timeline_digest()


def test_the_presence_process_alone_puts_each_client_online_exactly_in_its_windows():
    """Fed only its own events, the availability process keeps a client in the pool exactly while
    one of its daily windows is open, and accounts exactly the windows' overlap with the session."""
    from atoll.sim.realistic.availability import DailyWindows
    from atoll.sim.realistic.engine import SimClient
    from atoll.sim.realistic.presence import AvailabilityProcess

    class Daily:  # 8 h a day from 22:00, jitter up to 1 h, present 70 % of days
        start_hour, hours, jitter_hours, presence, clock_start_hour = 22.0, 8.0, 1.0, 0.7, 0.0

    horizon = 3 * 86_400.0
    windows = DailyWindows(Daily, Draws(5), horizon, clients=30)
    clients = [SimClient(i, i, "d", "n", 1.0, None, 8) for i in range(30)]
    queue, timeline = EventQueue(), []
    process = AvailabilityProcess(clients, windows, queue, rejoin_seconds=60.0, timeline=timeline, timeline_limit=30)
    process.start()
    open_window, close_window = process.window_handlers(lose=None)
    handlers = {EventKind.WINDOW_OPEN: open_window, EventKind.WINDOW_CLOSE: close_window}
    while queue:
        time, _, kind, index, token = queue.pop()
        if time > horizon:
            break
        assert handlers[kind](index, token, time)
        if queue and queue.peek_time() == time:
            continue  # judge once every event of this instant is handled
        online = {int(i) for i in process.available_ids()}
        expected = set()
        for client in clients:  # every window of the client that contains `time`
            cursor = 0
            while (window := windows.next(client.id, cursor)) is not None and window[0] <= time:
                start, end, cursor = window
                if start <= time < end:
                    expected.add(client.index)
        assert online == expected, time
    process_end = horizon
    for client in clients:
        process.finish(client, process_end)
        cursor, total = 0, 0.0
        while (window := windows.next(client.id, cursor)) is not None and window[0] < process_end:
            start, end, cursor = window
            total += min(end, process_end) - start
        assert client.available_seconds == pytest.approx(total)
    assert sum(end - start for _, _, start, end, _ in timeline) == pytest.approx(sum(c.available_seconds for c in clients))


def test_the_bucketed_queue_pops_exactly_like_one_heap():
    import heapq
    import random

    rng = random.Random(3)
    queue, reference, sequence = EventQueue(width=50.0), [], 0
    now = 0.0
    for step in range(20000):
        if rng.random() < 0.55 or not reference:
            when = now + (rng.choice([0.0, 0.0, 1.0]) if rng.random() < 0.2 else rng.expovariate(1 / 400.0))
            kind, client = rng.randrange(9), rng.randrange(50)
            queue.push(when, kind, client, step)
            sequence += 1
            heapq.heappush(reference, (when, sequence, kind, client, step))
        else:
            got, expected = queue.pop(), heapq.heappop(reference)
            assert got == expected
            now = got[0]
        assert len(queue) == len(reference) and bool(queue) == bool(reference)
    while reference:
        assert queue.pop() == heapq.heappop(reference)
    assert not queue


class ListSource:
    """A queue source over a fixed sorted list of window events (time, signed client, end)."""

    def __init__(self, rows):
        self.rows = rows
        self.given = 0
        self.releases = []
        self.next_time = rows[0][0] if rows else math.inf

    def release(self, until):
        import numpy as np

        high = self.given
        while high < len(self.rows) and self.rows[high][0] < until:
            high += 1
        batch = self.rows[self.given : high]
        self.given = high
        self.next_time = self.rows[high][0] if high < len(self.rows) else math.inf
        self.releases.append(until)
        return (
            np.array([r[0] for r in batch], dtype=float),
            np.array([r[1] for r in batch], dtype=np.int64),
            np.array([r[2] for r in batch], dtype=float),
        )


def test_the_queue_merges_its_source_stream_with_pushed_events_in_time_and_sequence_order():
    """Window events come from a source an hour at a time, never as pushed tuples; pops merge
    them with pushed events: every event once, by time, equal times by sequence number, and no
    stream event is released before the clock is within an hour of it."""
    import random

    rng = random.Random(11)
    rows = sorted(
        (
            (float(rng.randrange(0, 40 * 3600, 600)), rng.choice([1, -1]) * rng.randrange(1, 30), float(rng.randrange(10**6)))
            for _ in range(3000)
        ),
        key=lambda row: row[0],
    )
    source = ListSource(rows)
    queue = EventQueue()
    queue.attach(source)
    pushed, popped, now = [], [], 0.0
    while queue:
        if rng.random() < 0.4:
            when = now + rng.choice([0.0, 600.0, 3600.0 * rng.random(), 7200.0 * rng.randrange(3)])
            token = len(pushed)
            queue.push(when, int(EventKind.DOWNLOAD_DONE), 99, token)
            pushed.append((when, int(EventKind.DOWNLOAD_DONE), 99, token))
            continue
        item = queue.pop()
        assert not popped or (item[0], item[1]) > (popped[-1][0], popped[-1][1]), "by time, then sequence"
        assert all(until <= item[0] + 3600.0 for until in source.releases), "released at most an hour ahead"
        popped.append(item)
        now = item[0]
    windows = [(t, int(EventKind.WINDOW_OPEN) if c >= 0 else int(EventKind.WINDOW_CLOSE), c if c >= 0 else ~c, e) for t, c, e in rows]
    assert sorted(item[:1] + item[2:] for item in popped) == sorted(windows + pushed)
    assert len({item[1] for item in popped}) == len(popped)  # sequence numbers are unique
