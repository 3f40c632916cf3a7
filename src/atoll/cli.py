"""The ``atoll`` command."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from atoll.console import fail, quiet_libraries
from atoll.errors import AtollError
from atoll.hybrid.cli import hybrid_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated LoRA fine-tuning across data islands.")


def _format_summary(summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    final = summary.get("final_global", {})
    local = summary.get("final_local", {})
    lines = [
        f"{summary['algorithm']} on {summary['data']} with {summary['model']}: {summary['clients']} clients, {summary['rounds']} rounds"
    ]
    if metric in final:
        text = f"global {metric} {final[metric]:.4f}"
        if "majority_class_rate" in summary:
            gain = 100 * summary["gain_over_majority"]
            text += f" vs majority-class rate {summary['majority_class_rate']:.4f} ({gain:+.1f} points)"
        lines.append(text)
    if metric in local:
        lines.append(f"local {metric} {local[metric]:.4f} (mean over clients' own test splits)")
    mb = (summary["bytes_up_total"] + summary["bytes_down_total"]) / 1e6
    lines.append(f"traffic {mb:.2f} MB in total; rounds took {summary['wall_seconds_rounds']:.1f} s")
    if summary.get("mode") == "realistic":
        from atoll.sim.realistic.runner import summary_line

        lines.append(summary_line(summary))
    lines.append(f"run directory: {summary['run_dir']}")
    return "\n".join(lines)


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="YAML config; omit for the built-in quickstart"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set federation.clients=50"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="continue a killed run from its newest checkpoint"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="log lines only, no progress bars"),
    dry_run: bool = typer.Option(False, "--dry-run", help="realistic mode, system only: the cost model without data, model or training"),
    engine: Optional[str] = typer.Option(None, "--engine", help="local (default) or flower: same as --set engine=..."),
) -> None:
    """Run a federation (the quickstart when no CONFIG is given)."""
    from atoll.config import load_config
    from atoll.input_checks import check_run_location
    from atoll.resolve import resolve

    cfg = resolved = None
    try:  # config errors first, before torch or any model library is imported
        if resume is not None:
            given = [name for name, value in (("CONFIG", config), ("--set", set_), ("--engine", engine), ("--dry-run", dry_run)) if value]
            if given:
                raise AtollError(f"{given[0]} cannot be combined with --resume", "--resume continues the run as its own config.yaml says")
            from atoll.report.rundir import RunDir

            _, cfg = RunDir.open_existing(resume)
            resolve(cfg)
        else:
            if dry_run:
                set_ = list(set_) + ["mode=realistic", "realistic.dry_run=true"]
            if engine is not None:
                set_ = list(set_) + [f"engine={engine}"]
            cfg = load_config(config, set_)
            resolved = resolve(cfg)
            check_run_location(cfg)  # a new run only: a resumed one lives where it is
    except AtollError as error:
        fail(error)
    quiet_libraries()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    from atoll.report.progress import make_progress
    from atoll.dispatch import resume_run, start_run

    try:
        if resume is not None:
            _, summary = resume_run(resume, make_progress(quiet))
        else:
            _, summary = start_run(resolved, make_progress(quiet))
    except AtollError as error:
        fail(error)
    except KeyboardInterrupt:
        if cfg is not None and (cfg.mode == "realistic" or cfg.engine == "flower"):
            why = "realistic-mode runs cannot be resumed: run the same config again (the same seed replays the same timeline)"
            if cfg.engine == "flower":
                why = "Flower runs cannot be resumed (clients' private state lived on their nodes): run the config again"
            typer.echo(f"atoll: interrupted; {why}", err=True)
        else:
            typer.echo("atoll: interrupted; continue with `atoll run --resume RUN_DIR`", err=True)
        raise typer.Exit(130) from None
    typer.echo(_format_summary(summary))


@app.command("list")
def list_(
    what: Optional[str] = typer.Argument(
        None, help="models, datasets, tasks, partitioners, algorithms, or one algorithm's name for its parameters"
    ),
) -> None:
    """Show the models, datasets, tasks, partitioners and algorithms that exist (`atoll list NAME`:
    one algorithm's parameters, set as algorithm.KEY)."""
    from rich.console import Console
    from rich.table import Table

    from atoll import algorithms
    from atoll.data.partition import PARTITIONERS
    from atoll.data.sources import BUILTIN_SOURCES
    from atoll.models.registry import BUILTIN_MODELS

    sections = {
        "models": [
            (m.name, m.family + (", pretrained" if m.pretrained else ", random init"), m.description) for m in BUILTIN_MODELS.values()
        ]
        + [("<directory>", "any", "a local Hugging Face model directory"), ("<org/name>", "any", "a hub model (online only)")],
        "datasets": [(s.name, s.task, s.description) for s in BUILTIN_SOURCES.values()]
        + [("<file>", "auto", "local .json / .jsonl / .csv / .parquet"), ("<org/name>", "auto", "a hub dataset (online only)")],
        "tasks": [
            ("classification", "accuracy, macro_f1", "text -> class with a trained head"),
            ("sft", "loss, perplexity", "instruction -> response; loss on the response only"),
            ("math", "exact_match", "question -> worked answer '#### N'; generation + answer extraction"),
            ("completion", "loss, perplexity, token_accuracy", "text -> its continuation (no template); next-token prediction"),
        ],
        "partitioners": [(name, "", text) for name, text in PARTITIONERS.items()],
    }
    specs = algorithms.specs()  # declarations only: no algorithm module is imported
    if what in specs:  # one algorithm: its parameters
        spec = specs[what]
        typer.echo(f"{spec.name}: {spec.paper}")
        for key, field in spec.Params.model_fields.items():
            typer.echo(f"  algorithm.{key:24} {_default_text(field.default):12} {field.description or ''}")
        if not spec.Params.model_fields:
            typer.echo("  (no parameters)")
        return
    if what is not None and what not in sections and what != "algorithms":
        choices = ", ".join([*sections, "algorithms"])
        fail(AtollError(f"nothing called '{what}' to list", f"choose one of: {choices}, or an algorithm name"))
    console = Console(width=100)
    for name, rows in sections.items():
        if what is not None and name != what:
            continue
        table = Table(title=name, title_justify="left", show_header=False)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    if what in (None, "algorithms"):
        console.print(algorithm_table(specs))


def algorithm_table(specs: dict):
    """Every algorithm's declared capabilities, one row each, with a header (fits 100 columns)."""
    import textwrap

    from rich import box
    from rich.table import Table

    def mark(value: bool) -> str:
        return "yes" if value else "-"

    table = Table(title="algorithms (`atoll list NAME`: paper and parameters)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("name", "mixed ranks", "async", "mean", "personal", "export", "global", "parameters"):
        table.add_column(column, no_wrap=True)
    for spec in specs.values():
        caps = spec.capabilities
        table.add_row(
            spec.name,
            caps.mixed_ranks,
            ("any rank" if caps.async_mixed_ranks else "yes") if caps.asynchronous else "-",
            mark(caps.weighted_mean),
            mark(caps.personal),
            mark(caps.personal_export),
            ("pooled" if caps.pooled_data else "yes") if caps.global_model else "-",
            # broken into lines here, at commas: the other columns and the gaps take 78 of the 100 columns
            "\n".join(textwrap.wrap(", ".join(spec.Params.model_fields), width=20, break_long_words=False)) or "-",
        )
    return table


def _default_text(value: Any) -> str:
    return "null" if value is None else str(value)


@app.command("config")
def config_keys(path: Optional[Path] = typer.Argument(None, help="print this config resolved with defaults")) -> None:
    """List every config key with its default and description (or resolve a config file)."""
    from atoll.config import describe_keys, load_config

    if path is not None:
        from atoll.resolve import resolve

        try:
            typer.echo(resolve(load_config(path)).config.to_yaml())
        except AtollError as error:
            fail(error)
        return
    for key, default, description in describe_keys():
        typer.echo(f"{key:32} {default:12} {description}")


def _add_flower_commands() -> None:
    """``atoll flower ...`` (SuperLink/SuperNode helpers; Flower is imported only when used)."""
    from atoll.engines.flower.commands import flower_app

    app.add_typer(flower_app, name="flower")


_add_flower_commands()
app.add_typer(hybrid_app, name="hybrid")  # atoll hybrid serve-cloud / chat / eval (torch only when a command runs)


def _add_pretrain_command() -> None:
    """``atoll pretrain`` (torch is imported only when it runs)."""
    from atoll.lm.cli import register

    register(app)


_add_pretrain_command()


def _add_bench_commands() -> None:
    """``atoll bench ...`` (atoll.report.bench.cli; torch is imported only when runs start)."""
    from atoll.report.bench.cli import bench_app

    app.add_typer(bench_app, name="bench")


_add_bench_commands()


def _add_split_commands() -> None:
    """``atoll split ...`` (atoll.split.cli; torch is imported only when a command runs)."""
    from atoll.split.cli import split_app

    app.add_typer(split_app, name="split")


_add_split_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
