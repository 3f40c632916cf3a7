"""``atoll bench security``: run the attack x protection matrix of configs/bench/security.yaml
(each cell an ordinary run, resumable: a finished cell is not run again, a killed one continues
from its last round checkpoint) and write the tables and plots into docs/security.md.
Registered in atoll.report.bench.cli; torch is imported only when runs start."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from atoll.console import fail
from atoll.errors import AtollError

RECORD = "security-matrix.json"


def _machine_note(results: dict[str, dict], workers: int) -> str:
    loads = [x for r in results.values() for x in (r.get("row", {}).get("load") or []) if x is not None]
    cpu = sum(r["row"]["cpu_seconds"] or 0 for r in results.values() if "row" in r)
    load = f"a 1-minute load average of {min(loads):.1f}–{max(loads):.1f} at the cells' starts and ends" if loads else "load not recorded"
    return (
        f"shared {os.cpu_count()}-core machine, other sessions running ({load}); every run with one torch thread under nice, "
        f"{'one run at a time' if workers <= 1 else f'{workers} runs at a time'}; CPU s is the run process's CPU time, wall s its elapsed time (inflated by the sharing); "
        f"{cpu / 60:.1f} CPU-minutes in all."
    )


def security_command(
    matrix_path: Path = typer.Argument(Path("configs/bench/security.yaml"), metavar="MATRIX", help="the attack x protection matrix"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated tasks of the matrix (default: all)"),
    doc: Path = typer.Option(Path("docs/security.md"), help="the page the tables go into (between its markers); plots and json beside it"),
    runs: Path = typer.Option(Path("runs/bench-security"), help="where the run directories go; the same command continues a killed bench"),
    workers: int = typer.Option(1, min=1, help="runs in parallel (one torch thread each; 1 runs in this process)"),
    render_only: bool = typer.Option(False, "--render-only", help="rewrite the tables and plots from the finished runs in --runs"),
) -> None:
    """Attack x protection matrix: accuracy, attack success, membership AUC, reconstruction ROUGE, ε, cost."""
    from atoll.privacy.bench.matrix import assignments, cells, load_matrix, refusal
    from atoll.report.compare import command_line

    try:
        matrix = load_matrix(matrix_path)
        chosen = cells(matrix, [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None)
    except AtollError as error:
        fail(error)
    record_path = runs / RECORD
    if render_only and not record_path.is_file():
        fail(AtollError(f"'{runs}' holds no security bench ({RECORD} is missing)", "run `atoll bench security` first or pass --runs"))
    results: dict[str, dict] = {c.key: {"protection": c.protection, "attack": c.attack} for c in chosen}
    for cell in chosen:  # refusals are the run config's own one-line checks: no torch, nothing run
        reason = refusal(cell)
        if reason:
            results[cell.key]["refused"] = reason
    names = {c.task for c in chosen}
    record = {
        "command": command_line(),
        "matrix": str(matrix_path),
        "tasks": {n: {"title": t.title, "set": assignments(t.set)} for n, t in matrix.tasks.items() if n in names},
        "workers": workers,
    }
    if render_only:
        earlier = json.loads(record_path.read_text())
        record["command"], record["workers"] = earlier["command"], earlier.get("workers", 1)
    else:
        from atoll.console import quiet_libraries
        from atoll.report.bench.runner import Job, run_jobs

        quiet_libraries()
        runs.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        jobs = [Job(c.key, c.directory(runs), c.config, (*c.overrides, "run.threads=1")) for c in chosen if "refused" not in results[c.key]]
        for key, reason in run_jobs(jobs, workers, typer.echo).items():
            results[key]["failed"] = reason
    from atoll.privacy.bench.collect import collect

    for cell in chosen:
        directory = cell.directory(runs)
        if "refused" not in results[cell.key] and (directory / "summary.json").is_file():
            results[cell.key]["row"] = collect(directory)
    record["machine_note"] = _machine_note(results, record["workers"])
    from atoll.privacy.bench.render import render

    written = render(record, results, doc)
    typer.echo("wrote " + ", ".join(str(p) for p in written))
