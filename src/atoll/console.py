"""What every ``atoll`` command shares on the terminal: quiet libraries and one-line user errors.

Sub-command packages (pretraining, split learning, hybrid inference) import these from here, not
from :mod:`atoll.cli`, which imports them back to register their commands.
"""

from __future__ import annotations

import logging
import os
import warnings

import typer

from atoll.errors import AtollError


def quiet_libraries() -> None:
    """No transformers/peft warning noise in the CLI (tests keep the warnings)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for name in ("peft", "datasets", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def fail(error: AtollError) -> None:
    """Print ``atoll: <what is wrong and how to fix it>`` on stderr and exit with code 2."""
    typer.echo(f"atoll: {error}", err=True)
    raise typer.Exit(2)
