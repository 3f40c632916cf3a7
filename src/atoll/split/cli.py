"""``atoll split ...``: run a split-learning config, serve the model party, list and explain keys.

Heavy imports (torch, transformers) happen inside the commands, so ``atoll --help`` and config
errors stay fast.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from atoll.console import fail, quiet_libraries
from atoll.errors import AtollError

split_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Split learning: a data party and a model party share one cut model."
)


def format_summary(summary: dict[str, Any]) -> str:
    final = summary.get("final", {})
    lines = [
        f"{summary['task']} on {summary['data']} with {summary['model']}, {summary['partition']} "
        f"({summary['head_blocks']}+{summary['model_party_blocks']}+{summary['tail_blocks']} blocks), "
        f"{summary['data_parties']} data part{'y' if summary['data_parties'] == 1 else 'ies'}, {summary['transport']} transport"
    ]
    shown = [f"{k} {final[k]:.4f}" for k in ("accuracy", "f1", "exact_match", "perplexity", "loss") if k in final]
    if shown:
        text = "test " + ", ".join(shown)
        if "majority_class_rate" in summary:
            text += f" (majority-class rate {summary['majority_class_rate']:.4f})"
        lines.append(text)
    traffic = summary["traffic"]
    lines.append(f"wire: {traffic['bytes_to_model'] / 1e6:.2f} MB to the model party, {traffic['bytes_to_data'] / 1e6:.2f} MB back")
    for name, result in summary.get("attacks", {}).items():
        if name == "knowledge_used":
            continue
        lines.append(f"attack {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k not in ("examples", "seconds")))
    lines.append(f"run directory: {summary['run_dir']}")
    return "\n".join(lines)


@split_app.command("run")
def run(
    config: Path = typer.Argument(..., help="split YAML config (see configs/split/)"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set split.head_blocks=2"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no per-evaluation lines"),
) -> None:
    """Train across the cut, evaluate, run the configured attacks, write a run directory."""
    from atoll.split.config import load_split_config

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        cfg = load_split_config(config, set_)  # config errors come before any heavy import
        from atoll.split.runner import run_split

        quiet_libraries()

        _, summary = run_split(cfg, say=(lambda _: None) if quiet else (lambda line: typer.echo(line, err=True)))
    except AtollError as error:
        fail(error)
    except KeyboardInterrupt:
        typer.echo("atoll: interrupted; split runs do not resume: run the config again (the same seed replays it)", err=True)
        raise typer.Exit(130) from None
    typer.echo(format_summary(summary))


@split_app.command("serve")
def serve(
    config: Path = typer.Argument(..., help="the same split config the data party runs"),
    out: Path = typer.Option(..., "--out", help="where the model party writes its adapter and what it received"),
    host: str = typer.Option("127.0.0.1", help="address to bind (anything but loopback needs --certificate and --key)"),
    port: int = typer.Option(50070, help="port to listen on (0: any free port)"),
    certificate: Optional[Path] = typer.Option(None, help="TLS certificate (PEM), e.g. server.pem from `atoll flower certs`"),
    key: Optional[Path] = typer.Option(None, help="the certificate's private key (PEM)"),
) -> None:
    """Serve the model party over gRPC until a data party finishes the run."""
    quiet_libraries()
    from atoll.split.server import serve as serve_model_party

    try:
        answered = serve_model_party(config, out, host, port, announce=lambda line: typer.echo(line), certificate=certificate, key=key)
    except AtollError as error:
        fail(error)
    typer.echo(f"model party answered {answered} requests; outputs in {out}")


@split_app.command("config")
def config_keys(path: Optional[Path] = typer.Argument(None, help="print this split config resolved with defaults")) -> None:
    """Every split config key with its default and description (or a config resolved)."""
    from atoll.config import describe_keys
    from atoll.split.config import SplitConfig, load_split_config

    if path is not None:
        try:
            typer.echo(load_split_config(path).to_yaml())
        except AtollError as error:
            fail(error)
        return
    for key, default, description in describe_keys(SplitConfig):
        typer.echo(f"{key:34} {default:14} {description}")


@split_app.command("list")
def list_(what: Optional[str] = typer.Argument(None, help="defenses, attacks, or one defense/attack name for its parameters")) -> None:
    """The defenses and attacks that exist (and one's parameters)."""
    from atoll.split.plugins import ATTACKS, DEFENSES, plugin_class

    for kind, registry in (("defense", DEFENSES), ("attack", ATTACKS)):
        if what in registry:
            cls = plugin_class(kind, what)
            typer.echo(f"{what}: {cls.summary}\n  paper: {cls.paper}")
            for key, field in cls.Params.model_fields.items():
                typer.echo(f"  {key:16} {json.dumps(field.default):12} {field.description or ''}")
            return
    if what not in (None, "defenses", "attacks"):
        fail(AtollError(f"nothing called '{what}' to list", f"choose defenses, attacks, or one of: {', '.join([*DEFENSES, *ATTACKS])}"))
    for kind, registry in (("defenses", DEFENSES), ("attacks", ATTACKS)):
        if what in (None, kind):
            typer.echo(f"{kind}:")
            for name in registry:
                typer.echo(f"  {name:22} {plugin_class(kind[:-1], name).summary}")


@split_app.command("bench")
def bench(
    config: Path = typer.Argument(Path("configs/split/bench.yaml"), help="bench config: base split config, cuts, defense sweeps, attacks"),
    out: Path = typer.Option(Path("runs/split-bench"), "--out", help="where cells are recorded (bench.jsonl) and run; a rerun resumes"),
    doc: Path = typer.Option(Path("docs/split.md"), "--doc", help="Markdown file the table is written into (between the bench markers)"),
    plot: Path = typer.Option(Path("docs/split-bench.png"), "--plot", help="trade-off plot (main task against each attack)"),
    render_only: bool = typer.Option(False, "--render-only", help="write the table and plot from the recorded cells, run nothing"),
) -> None:
    """Attack x defense x cut-point grid: main task, attack performance and DCS as a table and a plot."""
    import os
    import time

    from atoll.split.bench import load_bench_config, plot_tradeoff, read_records, render_table, run_bench, write_into

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        bench_config = load_bench_config(config)
        started = time.time()
        load_before = os.getloadavg()[0]
        if render_only:
            records = read_records(out)
            if not records:
                raise AtollError(f"no recorded cells in '{out}'", "run the bench first (without --render-only)")
        else:
            quiet_libraries()
            records = run_bench(bench_config, out, say=lambda line: typer.echo(line, err=True))
        cell_seconds = sum(r.get("seconds", 0.0) for r in records)
        cpu_seconds = sum(r.get("cpu_seconds", 0.0) for r in records)
        loads = [r["load_average"] for r in records if "load_average" in r]
        note = (
            f"{len(records)} cells; the runs took {cpu_seconds / 60:.1f} CPU minutes and {cell_seconds / 60:.1f} min of wall time in all "
            f"(one torch thread, under `nice`, on the shared 2-core machine: 1-minute load average "
            f"{min(loads, default=load_before):.1f}-{max(loads, default=load_before):.1f} while the cells ran), resumed cells included."
        )
        command = f"atoll split bench {config}"
        write_into(doc, render_table(bench_config, records, command, note))
        plot_tradeoff(bench_config, [r for r in records if "mp" in r], plot)
    except AtollError as error:
        fail(error)
    typer.echo(f"table written into {doc}, plot {plot} ({time.time() - started:.0f} s)")
