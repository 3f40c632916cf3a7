"""``atoll pretrain CONFIG``: train a small causal LM and its tokenizer from scratch (see atoll.lm.pipeline)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
import typer

from atoll.errors import AtollError


def pretrain_command(
    config: Path = typer.Argument(..., help="pretraining YAML, e.g. configs/pretrain/edge.yaml"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set train.steps=200"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="log lines instead of a progress bar"),
) -> None:
    """Pretrain a Llama causal LM and its byte-level BPE on the open corpus; running the same
    command again after a kill resumes from the last checkpoint."""
    from atoll.console import fail, quiet_libraries

    quiet_libraries()
    from atoll.lm.config import load_pretrain_config
    from atoll.lm.pipeline import pretrain

    try:
        cfg = load_pretrain_config(config, set_)
    except AtollError as error:
        fail(error)
    command = "atoll pretrain " + " ".join(shlex.quote(a) for a in [str(config)] + [x for s in set_ for x in ("--set", s)])
    bar = _Bar(cfg.train.steps, quiet or not sys.stderr.isatty())
    try:
        with bar:
            result = pretrain(cfg, command, report=bar.report, message=bar.message)
    except AtollError as error:
        fail(error)
    except KeyboardInterrupt:
        typer.echo(f"atoll: interrupted; run the same command again to resume from {cfg.work_dir}", err=True)
        raise typer.Exit(130) from None
    typer.echo(f"wrote {result.out_dir}")


class _Bar:
    """A rich bar (step, loss, tokens/s, time left), or one log line per report with --quiet."""

    def __init__(self, steps: int, plain: bool) -> None:
        self.steps = steps
        self.plain = plain
        self.bars = None
        self.task = None
        self.last_logged = 0

    def __enter__(self) -> "_Bar":
        if not self.plain:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bars = Progress(
                TextColumn("pretraining"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[rate]} tok/s  left {task.fields[left]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self.bars.start()
            self.task = self.bars.add_task("pretrain", total=self.steps, loss="-", rate="-", left="-")
        return self

    def __exit__(self, *exc) -> None:
        if self.bars is not None:
            self.bars.stop()

    def message(self, text: str) -> None:
        if self.bars is not None:
            self.bars.console.print(text)
        else:
            typer.echo(text, err=True)

    def report(self, step: int, loss: float, rate: float, left: float) -> None:
        left_text = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
        if self.bars is not None:
            self.bars.update(self.task, completed=step, loss=f"{loss:.3f}", rate=f"{rate:,.0f}", left=left_text)
        elif step - self.last_logged >= max(1, self.steps // 100) or step == self.steps:
            self.last_logged = step
            typer.echo(f"step {step}/{self.steps} loss {loss:.4f} {rate:,.0f} tok/s left {left_text}", err=True)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain_command)
