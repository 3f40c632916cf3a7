"""`atoll bench algorithms` and `atoll bench sweep` (registered in atoll.cli; torch is imported
only when runs start)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from atoll.console import fail, quiet_libraries
from atoll.errors import AtollError
from atoll.privacy.bench.cli import security_command

bench_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Comparisons and benchmarks.")
bench_app.command("security")(security_command)  # atoll.privacy.bench.cli

DEFAULT_SUITE = Path("configs/bench/suite.yaml")


def _names(text: Optional[str]) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


@bench_app.command("algorithms")
def algorithms_command(
    suite_path: Path = typer.Argument(DEFAULT_SUITE, metavar="SUITE", help="the benchmark suite (tasks, partitions, families)"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated tasks of the suite (default: all)"),
    algorithms: Optional[str] = typer.Option(None, help="comma-separated algorithms (default: each task's)"),
    partitions: Optional[str] = typer.Option(None, help="comma-separated partitions (default: each task's)"),
    seeds: Optional[int] = typer.Option(None, help="seeds 0..N-1 per cell (default: the suite's)"),
    workers: int = typer.Option(2, help="runs in parallel (one torch thread each; 1 runs in this process)"),
    out: Path = typer.Option(Path("docs"), help="where algorithms.md, its plots and algorithms.json go"),
    runs: Path = typer.Option(Path("runs/bench"), help="where the run directories go; the same command continues a killed bench"),
    set_: list[str] = typer.Option([], "--set", help="override a key in every run"),
    render_only: bool = typer.Option(False, "--render-only", help="rewrite the table, plots and json from the finished runs in --runs"),
    rerun: Optional[str] = typer.Option(
        None,
        "--rerun",
        help="comma-separated algorithms of the finished bench in --runs to run again (their rows are replaced; needs --why)",
    ),
    why: Optional[str] = typer.Option(None, "--why", help="with --rerun: the reason, recorded under the table"),
) -> None:
    """Every algorithm x partition x seed of a suite's tasks: tables with intervals, and curves."""
    from atoll.report.compare import BENCH_RECORD

    quiet_libraries()
    if render_only or rerun:
        _rerender(runs, out, rerun, why, workers, BENCH_RECORD)
        return
    from atoll.report.compare import command_line, plan, run_comparison
    from atoll.report.bench.suite import load_suite

    try:
        suite = load_suite(suite_path)
        chosen = _names(tasks) or list(suite.tasks)
        record = plan(suite, chosen, _names(partitions), _names(algorithms), seeds or suite.seeds)
        record["extra"] = list(set_)
        from atoll.config import load_config

        for task in chosen:  # a bad --set or base config is one line before anything runs
            load_config(suite.config_path(task), list(set_))
        path = run_comparison(suite, record, runs, out, workers, command_line())
    except AtollError as error:
        fail(error)
    typer.echo(f"wrote {path} and its plots")


def _rerender(runs: Path, out: Path, rerun: Optional[str], why: Optional[str], workers: int, record_name: str) -> None:
    from atoll.report.compare import render, rerun_algorithms

    if not (runs / record_name).is_file():
        fail(
            AtollError(f"'{runs}' holds no finished bench ({record_name} is missing)", "run `atoll bench algorithms` first or pass --runs")
        )
    if rerun:
        names = _names(rerun) or []
        record = json.loads((runs / record_name).read_text())
        benched = sorted({a for spec in record["tasks"].values() for a in spec["algorithms"]})
        missing = [n for n in names if n not in benched]
        if missing or not names:
            fail(
                AtollError(
                    f"--rerun: '{(missing or [rerun])[0]}' is not an algorithm of the bench in '{runs}'",
                    f"choose from: {', '.join(benched)}",
                )
            )
        if not why or not why.strip():
            fail(
                AtollError(
                    "--rerun needs --why",
                    "say why the rows change, e.g. --why 'default changed to option I'; it is printed under the table",
                )
            )
        path = rerun_algorithms(names, why.strip(), runs, out, workers)
    else:
        path = render(runs, out)
    typer.echo(f"wrote {path} and its plots")


@bench_app.command("sweep")
def sweep_command(
    suite_path: Path = typer.Argument(DEFAULT_SUITE, metavar="SUITE", help="the benchmark suite (tasks, partitions, families, grid)"),
    tasks: Optional[str] = typer.Option(None, help="comma-separated tasks of the suite (default: all)"),
    workers: int = typer.Option(2, help="runs in parallel (one torch thread each; 1 runs in this process)"),
    runs: Path = typer.Option(Path("runs/bench-sweep"), help="where the sweep's run directories go; the same command continues it"),
    set_: list[str] = typer.Option([], "--set", help="override a key in every run"),
    extend: bool = typer.Option(
        False, "--extend", help="run only the learning rates the file has no score for (a grid grown past its edge); keep the rest"
    ),
) -> None:
    """Choose each family's peak learning rate per task on the validation split; write the suite's
    learning-rate file."""
    quiet_libraries()
    from atoll.report.compare import command_line
    from atoll.report.bench.suite import load_suite
    from atoll.report.bench.sweep import run_sweep

    try:
        suite = load_suite(suite_path)
        chosen = _names(tasks) or list(suite.tasks)
        from atoll.config import load_config

        for task in chosen:
            if task in suite.tasks:
                load_config(suite.config_path(task), list(set_))
        path = run_sweep(suite, chosen, runs, workers, list(set_), command_line(), extend=extend)
    except AtollError as error:
        fail(error)
    typer.echo(f"wrote {path}")
