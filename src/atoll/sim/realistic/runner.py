"""Realistic-mode runs: assemble the fleet and the backend, run the event loop, write the run
directory (the prototype's files plus timeline, per-client and system outputs)."""

from __future__ import annotations

import csv
import io
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from atoll.fl.capabilities import POOLED_CLIENT
from atoll.config import Config
from atoll.report.progress import Progress
from atoll.report.recorder import Recorder
from atoll.report.rundir import RunDir, write_atomic
from atoll.sim.realistic import plots
from atoll.sim.realistic.availability import build_availability
from atoll.sim.realistic.backends import DryBackend, ModelBackend
from atoll.sim.realistic.draws import Draws
from atoll.sim.realistic.engine import Link, SimClient, Simulation
from atoll.sim.realistic.system import (
    Fleet,
    SystemSpec,
    _as_lognormal,
    describe_spec,
    device_profiles,
    geometry_for,
    network_profiles,
    system_source,
    trace_path,
)


def make_clients(config: Config, spec: SystemSpec, fleet: Fleet, pooled: bool = False) -> list[SimClient]:
    """One SimClient per federation client (plus the server-side pooled client when asked)."""
    devices = device_profiles(spec)
    networks = network_profiles(spec)
    links = {}
    for name in fleet.network_names:
        profile = networks[name]
        down, up = _as_lognormal(profile.down_mbps), _as_lognormal(profile.up_mbps)
        links[name] = Link(down.median, down.sigma, up.median, up.sigma, profile.latency_ms / 1000.0)
    clients = []
    ranks = fleet.ranks if fleet.ranks is not None and config.realistic.dry_run else None
    for client_id in range(config.federation.clients):
        device = fleet.device_names[int(fleet.device[client_id])]
        network = fleet.network_names[int(fleet.network[client_id])]
        throughput = devices[device].tflops * 1e12 * float(fleet.speed[client_id])
        rank = int(ranks[client_id]) if ranks is not None else config.rank_of(client_id)
        clients.append(SimClient(client_id, client_id, device, network, throughput, links[network], rank))
    if pooled:
        server = spec.server.device
        clients.append(
            SimClient(
                len(clients), POOLED_CLIENT, server, "local", devices[server].tflops * 1e12, None, config.model.lora.rank, pooled=True
            )
        )
    return clients


def build_simulation(
    config: Config, spec: SystemSpec, fleet: Fleet, backend, on_record=None, record_events: bool | None = None
) -> Simulation:
    settings = config.realistic
    pooled = not backend.dry and POOLED_CLIENT in backend.clients
    clients = make_clients(config, spec, fleet, pooled)
    horizon = settings.session_hours * 3600.0
    availability = build_availability(spec, config.federation.clients, Draws(config.seed), horizon, trace_path(spec, system_source(config)))
    if record_events is None:
        record_events = config.federation.clients <= settings.timeline_clients
    return Simulation(
        clients,
        availability,
        backend,
        settings,
        seed=config.seed,
        rounds=config.federation.rounds,
        eval_every=config.eval.every,
        dropout_probability=spec.availability.dropout.probability,
        rejoin_seconds=spec.availability.dropout.rejoin_minutes * 60.0,
        on_record=on_record,
        record_timeline=settings.timeline_clients,
        record_events=record_events,
    )


def dry_backend(config: Config, spec: SystemSpec, fleet: Fleet) -> DryBackend:
    geometry = geometry_for(config, spec)
    if fleet.ranks is not None:
        ranks = [int(r) for r in fleet.ranks]
    else:
        ranks = [config.rank_of(c) for c in range(config.federation.clients)]
    return DryBackend(config, spec, geometry, ranks)


# ---------------------------------------------------------------------------------------------
# outputs


def system_report(sim: Simulation) -> dict[str, Any]:
    """Utilization per device profile, traffic, lost work, dropouts, staleness, event counts."""
    devices: dict[str, Counter] = {}
    networks: Counter = Counter()
    ranks: Counter = Counter()
    for client in sim.clients:
        if client.pooled:
            continue
        row = devices.setdefault(client.device, Counter())
        row["clients"] += 1
        row["online_seconds"] += client.available_seconds
        row["train_seconds"] += client.train_seconds
        row["transfer_seconds"] += client.transfer_seconds
        row["wasted_seconds"] += client.wasted_seconds
        row["jobs"] += client.jobs
        row["completed"] += client.completed
        row["lost"] += client.lost
        row["dropouts"] += client.dropouts
        networks[client.network] += 1
        ranks[client.rank] += 1
    device_rows = {}
    for name, row in sorted(devices.items()):
        online = row["online_seconds"] or 1.0
        device_rows[name] = {
            **{k: float(v) for k, v in row.items()},
            "train_share": row["train_seconds"] / online,
            "wasted_share": row["wasted_seconds"] / online,
            "transfer_share": row["transfer_seconds"] / online,
        }
    totals = sim.totals
    return {
        "virtual_seconds": sim.now,
        "stopped_by": sim.stopped_by,
        "events": sim.events,
        "stale_events": sim.stale_events,
        "timeline_digest": sim.timeline_digest(),
        "devices": device_rows,
        "networks": dict(sorted(networks.items())),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "bytes_down": int(totals.bytes_down),
        "bytes_up": int(totals.bytes_up),
        "wasted": {
            "jobs": int(sum(totals.lost_jobs.values())),
            "by_cause": dict(sorted(totals.lost_jobs.items())),
            "train_seconds": totals.wasted_train_seconds,
            "bytes": int(totals.wasted_bytes),
        },
        "dropouts": totals.dropouts,
        "jobs": {
            "started": totals.jobs_started,
            "delivered": totals.jobs_delivered,
            "aggregated": totals.updates_aggregated,
            "skipped": totals.skipped,
        },
        "staleness_histogram": {str(k): v for k, v in sorted(totals.staleness.items())},
        "wall_seconds": {
            "loop": sim.loop_seconds,
            "loop_cpu": sim.loop_cpu_seconds,
            "event_machinery": sim.machinery_seconds,
            **{k: float(v) for k, v in sorted(sim.wall.items())},
        },
    }


def _csv(rows: list[list[Any]], header: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_outputs(run_dir: RunDir, sim: Simulation, spec: SystemSpec, config: Config, title: str, metric: str | None) -> dict[str, Any]:
    path = run_dir.path
    report = system_report(sim)
    write_atomic(path / "system.json", json.dumps(report, indent=1, sort_keys=True))
    write_atomic(
        path / "timeline.csv",
        _csv([[c, p, f"{s:.6f}", f"{e:.6f}", o] for c, p, s, e, o in sim.timeline], ["client", "phase", "start", "end", "outcome"]),
    )
    if sim.event_log is not None:
        write_atomic(path / "events.csv", _csv([[f"{t:.6f}", k, c] for t, k, c in sim.event_log], ["time", "event", "client"]))
    write_atomic(
        path / "clients.csv",
        _csv(
            [
                [
                    c.id,
                    c.device,
                    c.network,
                    f"{c.flops_per_second / 1e12:.6g}",
                    c.rank,
                    c.jobs,
                    c.completed,
                    c.lost,
                    c.dropouts,
                    f"{c.available_seconds:.1f}",
                    f"{c.train_seconds:.1f}",
                    f"{c.transfer_seconds:.1f}",
                    f"{c.wasted_seconds:.1f}",
                ]
                for c in sim.clients
            ],
            [
                "client",
                "device",
                "network",
                "tflops",
                "rank",
                "jobs",
                "delivered",
                "lost",
                "dropouts",
                "online_s",
                "train_s",
                "transfer_s",
                "wasted_s",
            ],
        ),
    )
    if not getattr(config.run, "plots", True):
        return report
    plots.plot_metric_vs_time(sim.records, metric, path / "metrics_time.png", title)
    if sim.timeline:
        dropouts = [(c, e) for c, _, _, e, o in sim.timeline if o == "dropout"]
        plots.plot_timeline(
            sim.timeline, path / "timeline.png", f"{title}: first {config.realistic.timeline_clients} clients", dropouts, sim.now
        )
    plots.plot_utilization(report["devices"], path / "utilization.png", "device utilization")
    plots.plot_staleness(
        {int(k): v for k, v in report["staleness_histogram"].items()}, path / "staleness.png", f"staleness ({config.realistic.paradigm})"
    )
    return report


def realistic_summary(sim: Simulation, report: dict[str, Any], config: Config, wall_total: float) -> dict[str, Any]:
    wall = report["wall_seconds"]
    return {
        "mode": "realistic",
        "paradigm": config.realistic.paradigm,
        "dry_run": config.realistic.dry_run,
        "system": config.system,
        "virtual_seconds": sim.now,
        "virtual_hours": sim.now / 3600.0,
        "rounds_completed": max((r["round"] for r in sim.records), default=0),
        "stopped_by": sim.stopped_by,
        "time_to_target_hours": None if sim.time_to_target is None else sim.time_to_target / 3600.0,
        "events": sim.events,
        "events_per_second": sim.events / sim.loop_seconds if sim.loop_seconds > 0 else None,
        "events_per_cpu_second": sim.events / sim.loop_cpu_seconds if sim.loop_cpu_seconds > 0 else None,
        "timeline_digest": report["timeline_digest"],
        "bytes_up_total": report["bytes_up"],
        "bytes_down_total": report["bytes_down"],
        "wasted": report["wasted"],
        "dropouts": report["dropouts"],
        "jobs": report["jobs"],
        "wall_seconds_total": wall_total,
        "event_machinery_seconds": wall["event_machinery"],
        "event_machinery_fraction": wall["event_machinery"] / wall_total if wall_total > 0 else None,
    }


# ---------------------------------------------------------------------------------------------
# the entry point


def start_realistic_run(run, progress: Progress) -> tuple[RunDir, dict[str, Any]]:
    """Everything that can fail on user input fails before the run directory exists."""
    started = time.perf_counter()
    config, spec, fleet = run.config, run.system, run.fleet
    path = RunDir.choose_path(config)
    RunDir.check_new(path)
    experiment = None
    if config.realistic.dry_run:
        backend = dry_backend(config, spec, fleet)
    else:
        from atoll.experiment import build

        experiment = build(run)
    try:
        run_dir = RunDir.create(path, config, run.to_json())
        write_atomic(path / "system.yaml", f"# resolved from {config.system}\n" + describe_spec(spec))
        progress.message(f"run directory {path}")
        federation = None
        if experiment is not None:
            from atoll.fl.federation import Federation

            federation = Federation(experiment)
            backend = ModelBackend(federation)
        recorder = Recorder(run_dir, progress, synced=federation is not None)
        sim = build_simulation(config, spec, fleet, backend, recorder.record)
        recorder.start(config.federation.rounds, 1)
        try:
            sim.run()
        finally:
            recorder.close()
        metric = federation.metric if federation is not None else None
        title = f"{config.algorithm.name} {config.realistic.paradigm} on {Path(config.system).stem}"
        report = write_outputs(run_dir, sim, spec, config, title, metric)
        summary = federation.finish(recorder) if federation is not None else dry_summary(config, run_dir)
        summary.update(realistic_summary(sim, report, config, time.perf_counter() - started))
        summary["wall_seconds_rounds"] = float(sum(r.get("wall_seconds", 0.0) for r in sim.records))
        run_dir.write_summary(summary)
        return run_dir, summary
    finally:
        if experiment is not None:
            experiment.close()


def dry_summary(config: Config, run_dir: RunDir) -> dict[str, Any]:
    return {
        "name": config.name,
        "algorithm": config.algorithm.name,
        "model": config.model.name,
        "data": "(dry run: no data)",
        "task": None,
        "metric": None,
        "clients": config.federation.clients,
        "rounds": config.federation.rounds,
        "final_global": {},
        "final_local": {},
        "run_dir": str(run_dir.path),
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def summary_line(summary: dict[str, Any]) -> str:
    """One line for the CLI: virtual time, server updates, why the run ended, lost work."""
    wasted = summary["wasted"]
    kind = summary["paradigm"] + (" dry run" if summary["dry_run"] else "")
    return (
        f"realistic {kind}: {_duration(summary['virtual_seconds'])} of virtual time, {summary['rounds_completed']} server updates, "
        f"stopped by {summary['stopped_by']}; {wasted['jobs']} jobs lost ({_duration(wasted['train_seconds'])} of device training), "
        f"{summary['dropouts']} dropouts"
    )
