"""Per-transfer bandwidth draws and trace availability of the realistic mode, recomputed by hand.

Network: every transfer draws its bandwidth as ``median * exp(sigma * z)`` with z a standard
normal keyed by (purpose, client index, job number) and clipped to [-3, 3]; the transfer lasts
``bytes * 8 / (bandwidth * 1e6) + latency``. The dry runs below move 1,000 bytes each way
(4 bytes * 250 trained parameters), so every phase duration can be recomputed from the draws.

Traces: a CSV of ``client,start,end`` windows; ``map: id`` or ``modulo`` (client c takes the
(c mod T)-th trace client in id order) and ``offset_seconds`` (virtual time 0 is that far into the
trace; windows ending by then vanish, one straddling it starts at 0).
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import yaml

from atoll.config import config_with
from atoll.resolve import resolve
from atoll.errors import DataError
from atoll.sim.realistic.availability import TraceWindows, read_trace
from atoll.sim.realistic.draws import Draws, gaussian
from atoll.sim.realistic.runner import build_simulation, dry_backend

NBYTES = 1000  # 4 bytes * (0 LoRA parameters per rank + 250 extra parameters)
LATENCY = 0.5
DEVICES = {
    "fast": {"tflops": 2.5e-8, "memory_gb": 1},
    "mid": {"tflops": 1.25e-8, "memory_gb": 1},
    "slow": {"tflops": 6.25e-9, "memory_gb": 1},
}
TRAIN = {"fast": 10.0, "mid": 20.0, "slow": 40.0}  # 250,000 FLOPs per job (see test_realistic_timeline.py)


def system(devices: dict, networks: dict, network_profiles: dict, availability: dict | None = None) -> dict:
    return {
        "devices": devices | {"profiles": DEVICES},
        "networks": networks | {"profiles": network_profiles},
        "availability": availability or {"windows": "always"},
        "workload": {
            "examples": 10,
            "tokens_per_example": 10,
            "model_parameters": 250,
            "lora_parameters_per_rank": 0,
            "extra_parameters": 250,
        },
    }


def make_sim(tmp_path, tree: dict, clients: int, **overrides):
    path = tmp_path / "sys.yaml"
    path.write_text(yaml.safe_dump(tree))
    values = {
        "mode": "realistic",
        "system": str(path),
        "realistic.dry_run": "true",
        "model.name": "tiny-bert",
        "federation.clients": clients,
        "federation.rounds": 2,
        "federation.sample_rate": 1.0,
        "train.local_steps": 1,
        "train.batch_size": 10,
        "run.root": str(tmp_path / "runs"),
    }
    values.update(overrides)
    run = resolve(config_with([f"{k}={v}" for k, v in values.items()]))
    config, spec, fleet = run.config, run.system, run.fleet
    return build_simulation(config, spec, fleet, dry_backend(config, spec, fleet), record_events=True)


def transfer(base: int, index: int, job: int, median: float, sigma: float) -> float:
    """The engine's rule, written out: z clipped to +-3, bandwidth in Mbit/s, then latency."""
    z = max(-3.0, min(3.0, gaussian(base, index, job)))
    return NBYTES * 8.0 / (median * math.exp(sigma * z) * 1e6) + LATENCY


# ---------------------------------------------------------------------------------------------
# per-transfer bandwidth spread

JITTERY = {"down_mbps": {"median": 0.008, "sigma": 0.5}, "up_mbps": {"median": 0.004, "sigma": 0.8}, "latency_ms": 500}
STEADY = {"down_mbps": 0.008, "up_mbps": 0.008, "latency_ms": 500}  # sigma 0: 1.5 s each way


def test_every_transfer_lasts_what_its_own_bandwidth_draw_says(tmp_path):
    """Four clients (three on a jittery network, one on a steady one), two of them per round for
    seven rounds: clients end up with different job counts, and each download and upload must last
    exactly what the draw keyed by (client index, that client's job number) gives."""
    devices = {"mix": {"fast": 1}, "clients": {0: "fast", 1: "mid", 2: "slow", 3: "fast"}}
    networks = {"mix": {"jittery": 1}, "clients": {0: "jittery", 1: "jittery", 2: "jittery", 3: "steady"}}
    tree = system(devices, networks, {"jittery": JITTERY, "steady": STEADY})
    sim = make_sim(tmp_path, tree, 4, **{"federation.rounds": 7, "federation.sample_rate": 0.5})
    sim.run()
    assert sim.stopped_by == "rounds" and sum(sim.totals.lost_jobs.values()) == 0
    down_base, up_base = sim.draws.base("bandwidth-down"), sim.draws.base("bandwidth-up")
    assert (down_base, up_base) == (Draws(sim.seed).base("bandwidth-down"), Draws(sim.seed).base("bandwidth-up"))

    phases = defaultdict(list)  # (client, phase) -> durations in job order
    for client, phase, start, end, outcome in sim.timeline:
        assert outcome == "ok" or phase == "online"
        phases[client, phase].append(end - start)
    jobs = [c.jobs for c in sim.clients]
    assert sum(jobs) == 14 and len(set(jobs)) > 1, "sampling 2 of 4 per round: job numbers differ from round numbers"
    rounds_of = defaultdict(list)
    for record in sim.records[1:]:
        for client in record["aggregated"]:
            rounds_of[client].append(record["round"])
    assert any(rounds_of[c] != list(range(1, len(rounds_of[c]) + 1)) for c in range(4))

    for client in sim.clients:
        i, n = client.index, client.jobs
        if client.network == "jittery":
            down = [transfer(down_base, i, job, 0.008, 0.5) for job in range(1, n + 1)]
            up = [transfer(up_base, i, job, 0.004, 0.8) for job in range(1, n + 1)]
        else:
            down = up = [1.5] * n
        assert phases[i, "download"] == pytest.approx(down, abs=1e-9, rel=0)
        assert phases[i, "upload"] == pytest.approx(up, abs=1e-9, rel=0)
        assert phases[i, "train"] == pytest.approx([TRAIN[client.device]] * n, abs=1e-9, rel=0)
        assert client.transfer_seconds == pytest.approx(sum(down) + sum(up), abs=1e-9, rel=0)
        if client.network == "jittery":
            # sigma has an effect: every job drew its own bandwidth, none at the median
            assert len(set(round(d, 9) for d in down)) == n and len(set(round(u, 9) for u in up)) == n
            assert all(abs(d - 1.5) > 1e-6 for d in down) and all(abs(u - 2.5) > 1e-6 for u in up)
            assert max(down) / min(down) > 1.2 and max(up) / min(up) > 1.2
    assert sim.totals.bytes_down == sim.totals.bytes_up == 14 * NBYTES

    # the event log agrees: each round ends when its slowest download + train + upload lands
    job_count, clock = defaultdict(int), 0.0
    for record in sim.records[1:]:
        spans = []
        for client_id in record["clients"]:
            client = sim.clients[client_id]
            job_count[client_id] += 1
            job = job_count[client_id]
            if client.network == "jittery":
                span = (
                    transfer(down_base, client_id, job, 0.008, 0.5) + TRAIN[client.device] + transfer(up_base, client_id, job, 0.004, 0.8)
                )
            else:
                span = 3.0 + TRAIN[client.device]
            spans.append(span)
        clock += max(spans)
        assert record["virtual_time"] == pytest.approx(clock, abs=1e-9, rel=0)
    uploads = [t for t, kind, _ in sim.event_log if kind == "UPLOAD_DONE"]
    assert uploads[-1] == pytest.approx(clock, abs=1e-9, rel=0)


def test_a_huge_sigma_is_clipped_at_three_standard_deviations(tmp_path):
    """2,000 clients, one job each, sigma 4: the draws past +-3 must give exactly the bandwidth
    median * exp(+-12), and every transfer stays within those bounds."""
    # 0.005 Mbit/s: 1.6 s for 1,000 bytes at the median, 9.8e-6 s at exp(+12), 2.6e5 s at exp(-12)
    clients, sigma, median = 2000, 4.0, 0.005
    wide = {"down_mbps": {"median": median, "sigma": sigma}, "up_mbps": {"median": median, "sigma": sigma}, "latency_ms": 500}
    tree = system({"mix": {"fast": 1}}, {"mix": {"wide": 1}}, {"wide": wide})
    sim = make_sim(tmp_path, tree, clients, **{"federation.rounds": 1, "realistic.session_hours": 1000})
    sim.run()
    assert sim.stopped_by == "rounds" and sim.totals.jobs_delivered == clients
    times = defaultdict(dict)
    for t, kind, client in sim.event_log:
        times[client][kind] = t
    down = [times[c]["DOWNLOAD_DONE"] for c in range(clients)]  # the round starts at 0
    up = [times[c]["UPLOAD_DONE"] - times[c]["TRAINING_DONE"] for c in range(clients)]
    assert [times[c]["TRAINING_DONE"] - times[c]["DOWNLOAD_DONE"] for c in range(clients)] == pytest.approx(
        [10.0] * clients, abs=1e-9, rel=0
    )

    fastest = NBYTES * 8.0 / (median * math.exp(3 * sigma) * 1e6) + LATENCY
    slowest = NBYTES * 8.0 / (median * math.exp(-3 * sigma) * 1e6) + LATENCY
    assert fastest - LATENCY > 5e-6 and slowest < 3e5  # both ends resolvable at 1e-9
    for purpose, measured in (("bandwidth-down", down), ("bandwidth-up", up)):
        base = sim.draws.base(purpose)
        z = [gaussian(base, c, 1) for c in range(clients)]
        high, low = [c for c in range(clients) if z[c] > 3.0], [c for c in range(clients) if z[c] < -3.0]
        assert high and low, "the seed must give draws past both clips"
        assert measured == pytest.approx([transfer(base, c, 1, median, sigma) for c in range(clients)], abs=1e-9, rel=0)
        assert all(fastest - 1e-9 <= m <= slowest + 1e-9 for m in measured)
        assert [measured[c] for c in high] == pytest.approx([fastest] * len(high), abs=1e-9, rel=0)
        assert [measured[c] for c in low] == pytest.approx([slowest] * len(low), abs=1e-9, rel=0)
        # unclipped, the same draws would have been further out
        for c in high + low:
            unclipped = NBYTES * 8.0 / (median * math.exp(sigma * z[c]) * 1e6) + LATENCY
            assert abs(unclipped - measured[c]) > 1e-8
        # and the spread is real: the slowest transfer takes over 1e6 times the fastest's
        assert (max(measured) - LATENCY) / (min(measured) - LATENCY) > 1e6
    assert sim.records[1]["virtual_time"] == pytest.approx(max(d + 10.0 + u for d, u in zip(down, up, strict=True)), abs=1e-9, rel=0)


# ---------------------------------------------------------------------------------------------
# availability traces

TRACE = """# a hand-made trace: ids 3, 7 and 10 only, rows out of order
client,start,end
7,500,900

7,100,200
3,50,80
3,0,50
10,1000,2000
# the end
"""
TRACE_WINDOWS = {3: [(0.0, 50.0), (50.0, 80.0)], 7: [(100.0, 200.0), (500.0, 900.0)], 10: [(1000.0, 2000.0)]}


def windows_of(availability, client: int) -> list[tuple[float, float]]:
    """Walk next(client, cursor) to the end, checking the cursor it hands back."""
    found, cursor = [], 0
    while (window := availability.next(client, cursor)) is not None:
        start, end, following = window
        assert following == cursor + 1
        found.append((start, end))
        cursor = following
    return found


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(TRACE)
    return path


def test_a_trace_is_read_sorted_per_client_and_touching_windows_are_allowed(trace):
    assert read_trace(trace) == TRACE_WINDOWS


def test_map_id_gives_trace_client_k_to_client_k_and_nothing_to_the_others(trace):
    windows = TraceWindows(read_trace(trace), 12)
    assert windows.next(7, 0) == (100.0, 200.0, 1) and windows.next(7, 1) == (500.0, 900.0, 2) and windows.next(7, 2) is None
    assert windows.first(3) == (0.0, 50.0, 1)
    expected = {3: TRACE_WINDOWS[3], 7: TRACE_WINDOWS[7], 10: TRACE_WINDOWS[10]}
    assert {c: windows_of(windows, c) for c in range(12)} == {c: expected.get(c, []) for c in range(12)}
    assert windows.clients_without_windows() == 9 and windows.unused == 0
    # a federation smaller than the trace's ids: trace client 10 is never used
    small = TraceWindows(read_trace(trace), 8)
    assert [windows_of(small, c) for c in range(8)] == [[], [], [], TRACE_WINDOWS[3], [], [], [], TRACE_WINDOWS[7]]
    assert small.unused == 1 and small.clients_without_windows() == 6


def test_map_modulo_gives_client_c_the_c_mod_t_th_trace_client(trace):
    """T = 3 trace clients (ids 3, 7, 10 in order): a federation of 8 cycles through them."""
    windows = TraceWindows(read_trace(trace), 8, "modulo")
    order = [3, 7, 10]
    assert [windows_of(windows, c) for c in range(8)] == [TRACE_WINDOWS[order[c % 3]] for c in range(8)]
    assert windows.next(5, 0) == (1000.0, 2000.0, 1) and windows.next(5, 1) is None
    assert windows.clients_without_windows() == 0 and windows.unused == 0


@pytest.mark.parametrize("mapping", ["id", "modulo"])
def test_an_offset_shifts_the_trace_and_drops_what_ended_before_it(trace, mapping):
    # 200 s into the trace: client 3's windows ended (80 <= 200) and client 7's first one ends
    # exactly at the offset (dropped: an empty window); 7 keeps 500..900 -> 300..700
    at_200 = {3: [], 7: [(300.0, 700.0)], 10: [(800.0, 1800.0)]}
    # 150 s: client 7's first window straddles the offset and opens at 0 (still ends at 50)
    at_150 = {3: [], 7: [(0.0, 50.0), (350.0, 750.0)], 10: [(850.0, 1850.0)]}
    clients = 11
    for offset, shifted in ((200.0, at_200), (150.0, at_150), (0.0, TRACE_WINDOWS)):
        windows = TraceWindows(read_trace(trace), clients, mapping, offset)
        source = (lambda c: [3, 7, 10][c % 3]) if mapping == "modulo" else (lambda c: c)
        assert [windows_of(windows, c) for c in range(clients)] == [shifted.get(source(c), []) for c in range(clients)]


def test_the_sys_yaml_trace_keys_drive_the_simulation(tmp_path, trace):
    """availability.trace {path (relative to the sys.yaml), map: modulo, offset_seconds} in a run:
    five clients cycle through the three trace clients, 150 s into the trace."""
    availability = {"windows": "trace", "trace": {"path": "trace.csv", "map": "modulo", "offset_seconds": 150}}
    tree = system({"mix": {"fast": 1}}, {"mix": {"steady": 1}}, {"steady": STEADY}, availability)
    sim = make_sim(tmp_path, tree, 5, **{"federation.rounds": 1000, "realistic.session_hours": 1})
    assert isinstance(sim.availability, TraceWindows)
    sim.run()
    assert sim.stopped_by == "no_events"  # every window of the trace has closed
    at_150 = {3: [], 7: [(0.0, 50.0), (350.0, 750.0)], 10: [(850.0, 1850.0)]}
    seen = defaultdict(list)
    for t, kind, client in sim.event_log:
        if kind in ("WINDOW_OPEN", "WINDOW_CLOSE"):
            seen[client].append((t, kind))
    for client in range(5):
        expected = [(t, k) for s, e in at_150[[3, 7, 10][client % 3]] for t, k in ((s, "WINDOW_OPEN"), (e, "WINDOW_CLOSE"))]
        assert seen[client] == expected
        online = sum(e - s for s, e in at_150[[3, 7, 10][client % 3]])
        assert sim.clients[client].available_seconds == pytest.approx(online, abs=1e-9, rel=0)
    assert sim.event_log[-2:] == [(1850.0, "WINDOW_CLOSE", 2), (1850.0, "SERVER_WAKE", -1)]
    # the rounds happened inside the windows: 13 s (1.5 + 10 + 1.5) a round, everyone online at once
    first = sim.records[1]
    assert first["virtual_time"] == 13.0 and first["aggregated"] == [1, 4]


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ("# comment\n\nclient,start,end\n0,0,10\n\n# another\n0,20,x\n", 7, "'0,20,x' is not an integer client and two numbers"),
        ("client,start,end\n1,0,10\n# skipped\n1,30,20\n", 4, "window 30..20 needs 0 <= start < end"),
        ("\nclient,start,end\n2,0,10,99\n", 3, "expected 3 columns"),
        ("client,start,end\n0,0,10\n-3,0,10\n", 3, "client id -3 is negative"),
    ],
)
def test_a_malformed_row_is_a_data_error_naming_the_file_and_line(tmp_path, text, line, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        read_trace(path)
    message = str(error.value)
    assert f"trace '{path}' line {line}: " in message and fragment in message and "\n" not in message


def test_overlapping_windows_of_one_client_are_refused_in_any_row_order(tmp_path):
    path = tmp_path / "overlap.csv"
    path.write_text("client,start,end\n0,0,100\n1,0,100\n0,300,400\n0,50,150\n")  # 1's window may overlap 0's
    with pytest.raises(DataError) as error:
        read_trace(path)
    assert f"trace '{path}'" in str(error.value) and "windows 0..100 and 50..150 of client 0 overlap" in str(error.value)
    # the same rows without the overlap are fine, whatever their order
    path.write_text("client,start,end\n0,300,400\n1,0,100\n0,100,150\n0,0,100\n")
    assert read_trace(path) == {0: [(0.0, 100.0), (100.0, 150.0), (300.0, 400.0)], 1: [(0.0, 100.0)]}


def test_a_run_that_runs_out_of_events_ends_at_its_last_real_event(tmp_path, trace):
    """A stale event popped last (the UPLOAD_DONE at 1851 of a job lost when its window closed at
    1850) does not move the clock: the run and its final evaluation end at 1850."""
    availability = {"windows": "trace", "trace": {"path": "trace.csv", "map": "modulo", "offset_seconds": 150}}
    tree = system({"mix": {"fast": 1}}, {"mix": {"steady": 1}}, {"steady": STEADY}, availability)
    sim = make_sim(tmp_path, tree, 5, **{"federation.rounds": 1000, "realistic.session_hours": 1, "eval.every": 1000})
    sim.run()
    assert sim.stopped_by == "no_events" and sim.event_log[-1][0] == 1850.0
    assert sim.records[-1]["final_evaluation"] and sim.records[-1]["virtual_time"] == 1850.0
    assert sim.now == 1850.0
