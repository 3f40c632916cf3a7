"""The pretraining corpus: the benchmark's text is absent, held-out chunks are stable, sources are explicit."""

from __future__ import annotations

import re

import pytest

from atoll.data import shakespeare
from atoll.errors import DataError
from atoll.lm import corpus


@pytest.fixture(scope="module")
def shakespeare_corpus():
    return corpus.build_corpus(["shakespeare"], 0.01, required=True)


def _letters(line: str) -> str:
    return re.sub(r"[^a-z ]", "", line.lower()).strip()


def test_benchmark_plays_are_absent_from_the_corpus(shakespeare_corpus):
    text = "\n".join(shakespeare_corpus.train + shakespeare_corpus.heldout)
    corpus_lines = {_letters(line) for line in text.split("\n")}
    benchmark = [line.text for play in shakespeare.BENCHMARK_PLAYS for line in shakespeare.parse_play(play, shakespeare.play_text(play))]
    long_lines = [line for line in benchmark if len(_letters(line)) >= corpus.BENCHMARK_LINE_CHARS]
    assert len(long_lines) > 10_000
    assert not [line for line in long_lines if _letters(line) in corpus_lines]
    assert "To be, or not to be" not in text and "O Romeo, Romeo! wherefore art thou Romeo?" not in text
    # the other plays are in (so the check above can fail): Macbeth's dagger speech
    assert "Is this a dagger which I see before me," in text
    assert "Of Mans First Disobedience, and the Fruit" in text  # Milton from the same archive


def test_lines_quoting_a_benchmark_play_are_removed_from_any_source():
    banned = corpus.benchmark_lines()
    fortune = "Words to live by:\n\tTo be, or not to be,--that is the question:--\n\t\t-- Hamlet\nAnd more."
    kept, dropped = corpus.without_benchmark_lines(fortune, banned)
    assert dropped == 1 and "question" not in kept and "Words to live by:" in kept and "-- Hamlet" in kept


def test_heldout_split_depends_on_the_chunk_text_only():
    text = "\n".join(f"line {i} of a long document with some words" for i in range(400))
    pieces = list(corpus.chunks(text, size=500))
    assert "\n".join(pieces) == text and all(len(p) <= 600 for p in pieces)
    chosen = [corpus.is_heldout(p, 0.3) for p in pieces]
    assert chosen == [corpus.is_heldout(p, 0.3) for p in reversed(pieces)][::-1]
    assert 0 < sum(chosen) < len(pieces)


def test_manifest_names_every_source_and_license(shakespeare_corpus):
    manifest = shakespeare_corpus.manifest
    (source,) = manifest["sources"]
    assert source["name"] == "shakespeare" and "CC-BY 2.5" in source["license"]
    assert manifest["train_characters"] == sum(len(c) for c in shakespeare_corpus.train) > 4_000_000
    assert manifest["heldout_chunks"] == len(shakespeare_corpus.heldout) > 0


def test_absent_sources_are_skipped_or_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "FORTUNES_DIR", tmp_path)
    with pytest.raises(DataError, match="apt-get install fortunes"):
        corpus.build_corpus(["fortunes"], 0.01, required=True)
    with pytest.raises(DataError, match="corpus is empty"):
        corpus.build_corpus(["fortunes"], 0.01, required=False)
    with pytest.raises(DataError, match="unknown corpus source 'gutenberg'"):
        corpus.build_corpus(["gutenberg"], 0.01)
    # required: a missing source is refused before any source is read (Shakespeare takes seconds to read)
    read = []
    monkeypatch.setitem(
        corpus.SOURCES,
        "shakespeare",
        corpus.SOURCES["shakespeare"].__class__(
            "shakespeare", "", "", "make data", lambda: read.append("shakespeare") or iter(()), lambda: None
        ),
    )
    with pytest.raises(DataError, match="corpus source 'fortunes' is not available.*apt-get install fortunes"):
        corpus.build_corpus(["shakespeare", "fortunes"], 0.01, required=True)
    assert read == []
