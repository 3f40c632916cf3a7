"""The Shakespeare-roles task: parsing, natural clients by role, the completion task, missing data."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from atoll.data import shakespeare
from atoll.errors import DataError

PLAY = """THE PLAY

ACT I.

Scene I. A room.

[Enter ANNA and BEN.]

ANNA.
First line of Anna,
second line of Anna. [Aside.]

BEN.
Ben answers.

[Exit ANNA.]

Scene II. Elsewhere.

BEN.
Ben in a new scene.

[Exeunt.]
"""


def test_parse_play_assigns_lines_to_speakers_with_their_cues():
    lines = shakespeare.parse_play("demo", PLAY)
    assert [(x.role, x.cue, x.text) for x in lines] == [
        ("ANNA", "", "First line of Anna,"),
        ("ANNA", "First line of Anna,", "second line of Anna."),  # stage direction dropped
        ("BEN", "second line of Anna.", "Ben answers."),
        ("BEN", "", "Ben in a new scene."),  # a new scene: no cue carries over
    ]


def test_roles_are_natural_clients_holding_their_own_lines():
    from atoll.data.sources import load_source

    raw = load_source("shakespeare")
    counts = collections.Counter(raw.columns["role"])
    assert len(counts) == 47 and min(counts.values()) >= shakespeare.MIN_LINES
    assert {role.split("/")[0] for role in counts} == set(shakespeare.BENCHMARK_PLAYS)
    hamlet = [line for role, line in zip(raw.columns["role"], raw.columns["line"], strict=True) if role == "hamlet/HAM"]
    assert "To be, or not to be,--that is the question:--" in hamlet
    assert raw.task == "completion" and raw.defaults == {"prompt_column": "cue", "response_column": "line"}
    # each cue is the line spoken just before (or empty at a scene start), ending in a newline
    index = raw.columns["line"].index("To be, or not to be,--that is the question:--")
    assert raw.columns["cue"][index + 1] == "To be, or not to be,--that is the question:--\n"


def test_natural_partition_gives_every_role_its_own_lines(tmp_path):
    from atoll.config import config_with
    from atoll.data.sources import load_source
    from atoll.data.tasks import Tokenized, resolve_task
    from atoll.experiment import make_splits

    config = config_with(
        ["data.source=shakespeare", "partition.name=natural", "partition.column=role", "federation.clients=47", "model.name=tiny-llama"]
    )
    raw = load_source("shakespeare")
    spec = resolve_task(config.data, raw)
    n = len(raw)
    fake = Tokenized(np.zeros(n, np.int32), np.arange(n + 1), np.full(n, -1), np.zeros(n, np.int32))
    splits = make_splits(config, fake, raw, spec)
    roles = np.array(raw.columns["role"])
    owners = [set(roles[np.concatenate([train, test])]) for train, test in zip(splits.client_train, splits.client_test, strict=True)]
    assert all(len(owner) == 1 for owner in owners)  # one role per client
    assert len({next(iter(o)) for o in owners}) == 47  # every role is a client
    assert all(len(test) > 0 for test in splits.client_test)  # each role has held-out lines
    assert len(splits.global_test) == round(0.1 * n)


def test_completion_task_scores_the_line_given_its_cue():
    from atoll.config import config_with
    from atoll.data.sources import RawData
    from atoll.data.tasks import _tokenize_uncached, resolve_task
    from atoll.models.registry import train_bpe_tokenizer

    raw = RawData({"cue": ["Who's there?\n", ""], "line": ["Nay, answer me.", "Long live the king!"]}, "completion", {})
    config = config_with(["data.prompt_column=cue", "data.response_column=line"])
    spec = resolve_task(config.data, raw)
    assert spec.kind == "completion" and spec.is_generative
    assert spec.corpus(raw) == ["Who's there?\nNay, answer me.", "Long live the king!"]  # no template
    import tempfile

    tokenizer = train_bpe_tokenizer(spec.corpus(raw) * 20, 300, Path(tempfile.mkdtemp()))
    data = _tokenize_uncached(spec, raw, tokenizer, 64)
    first = data.sequence(0)
    prompt = int(data.prompt_len[0])
    assert first[0] == tokenizer.bos_token_id
    assert tokenizer.decode(first[1:prompt]) == "Who's there?\n"
    assert tokenizer.decode(first[prompt:-1]) == "Nay, answer me." and first[-1] == tokenizer.eos_token_id
    assert int(data.prompt_len[1]) == 1  # an empty cue leaves only <s>


def test_missing_or_wrong_archive_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    from atoll.cli import app

    monkeypatch.setenv("ATOLL_DATA", str(tmp_path))
    with pytest.raises(DataError, match="make data"):
        shakespeare.archive_path()
    config = tmp_path / "c.yaml"
    config.write_text("data: {source: shakespeare}\npartition: {name: natural, column: role}\nmodel: {name: tiny-llama}\n")
    result = CliRunner().invoke(app, ["run", str(config), "--set", f"run.root={tmp_path / 'runs'}"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "make data" in result.output
    assert not (tmp_path / "runs").exists()
    (tmp_path / shakespeare.ARCHIVE_NAME).write_bytes(b"not the archive")
    with pytest.raises(DataError, match="SHA-256"):
        shakespeare.archive_texts()
