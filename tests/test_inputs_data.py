"""Local data files at the door: each format's mistakes (encoding, quoting, structure, missing
values) are one DataError line naming the file's own line and the fix; good files with a
byte-order mark read as they should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atoll.config import DataConfig
from atoll.data.sources import load_source
from atoll.data.tasks import resolve_task
from atoll.errors import DataError

ROWS = [("the team scored a goal", "sports"), ("rain and storm today", "weather"), ("pizza with cheese", "food")] * 4
CSV = "text,label\n" + "".join(f"{text},{label}\n" for text, label in ROWS)  # the header is line 1, row k is line k + 1
JSONL = "".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in ROWS)


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def refused(path: Path) -> str:
    with pytest.raises(DataError) as error:
        raw = load_source(str(path))
        resolve_task(DataConfig(source=str(path)), raw)
    text = str(error.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("d.csv", CSV + "hello, world,food\n", "line 14 has 3 fields but the header has 2 (text, label)"),
        ("d.csv", CSV + "hello, world,food\n", 'quote values that contain commas, e.g. "hello, world",positive'),
        ("d.csv", CSV + "lonely\n" + CSV[11:], "line 14 has 1 field but the header has 2"),
        ("d.csv", CSV + '"unclosed,food\nmore,food\n', "the row at lines 14-15 (an unclosed quote?)"),
        ("d.csv", (CSV + "caf\xe9 cr\xe8me,food\n").encode("latin-1"), "is not UTF-8: byte 0xe9 at line 14"),
        ("d.csv", CSV.replace(",", ";"), "has a single column 'text;label': atoll reads comma-separated files"),
        ("d.csv", "text,label,label\n" + "".join(f"{t},{lab},x\n" for t, lab in ROWS), "names column 'label' twice"),
        ("d.csv", "text,,label\n", "column 2 of the header"),
        ("d.csv", "", "is empty"),
        ("d.csv", "text,label\n", "holds no rows"),
        ("d.csv", CSV + ",food\n", "column 'text' is empty at line 14 of"),
        ("d.csv", CSV + "some text,\n", "column 'label' is empty at line 14 of"),
        (
            "d.jsonl",
            "".join(JSONL.splitlines(True)[:4]) + "\n\n" + '{"text": "x", "label": }\n',
            "line 7 is not valid JSON: Expecting value (column 24)",
        ),
        ("d.jsonl", JSONL + "[1, 2]\n", "line 13 is a JSON list, not an object"),
        ("d.jsonl", (JSONL + '{"text": "caf\xe9", "label": "food"}\n').encode("latin-1"), "byte 0xe9 at line 13"),
        ("d.jsonl", JSONL + '{"label": "food"}\n', "column 'text' has no value at line 13 of"),
        ("d.jsonl", JSONL + '{"text": "x", "label": null}\n', "column 'label' has no value at line 13"),
        ("d.jsonl", JSONL + '{"text": ["a"], "label": "food"}\n', "column 'text' holds a list at line 13"),
        ("d.json", "3", "must hold a list of objects or an object of columns, not a JSON int"),
        ("d.json", json.dumps({"text": ["a", "b"], "label": ["x"]}), "have different lengths (text 2, label 1)"),
        ("d.json", '[{"text": "a", "label": "x"},\n]', "is not valid JSON at line 2, column 1"),
        ("d.json", '[{"text": "a", "label": "x"}, 7]', "item 2 of"),
        ("d.parquet", b"PAR1garbage", "cannot read"),
        ("d.jsonl", "".join(json.dumps({"text": t, "label": "one"}) + "\n" for t, _ in ROWS), "has a single class"),
        ("d.jsonl", "".join(json.dumps({"text": f"t{i}", "label": f"l{i}"}) + "\n" for i in range(300)), "300 distinct values in 300 rows"),
    ],
)
def test_a_bad_data_file_is_one_line_with_its_line_number(tmp_path, name, content, fragment):
    assert fragment in refused(write(tmp_path, name, content))


@pytest.mark.parametrize(
    "name, content",
    [
        ("d.csv", b"\xef\xbb\xbf" + CSV.encode()),
        ("d.jsonl", b"\xef\xbb\xbf" + JSONL.encode()),
        ("d.json", b"\xef\xbb\xbf" + json.dumps([{"text": t, "label": lab} for t, lab in ROWS]).encode()),
        ("d.csv", CSV.replace("\n", "\r\n")),
        ("d.csv", 'text,label\n"hello, world",food\n' + CSV[11:]),
        ("d.jsonl", JSONL.replace("\n", "\n\n")),
    ],
)
def test_good_files_read_whole(tmp_path, name, content):
    raw = load_source(str(write(tmp_path, name, content)))
    spec = resolve_task(DataConfig(source=str(tmp_path / name)), raw)
    assert spec.text_column == "text" and spec.label_names == ["food", "sports", "weather"]
    assert len(raw) in (len(ROWS), len(ROWS) + 1)
    assert raw.columns["text"][0] in ("the team scored a goal", "hello, world")


def test_a_json_string_with_a_line_separator_stays_one_row(tmp_path):
    path = write(tmp_path, "d.jsonl", JSONL + json.dumps({"text": "a\u2028b", "label": "food"}, ensure_ascii=False) + "\n")
    assert load_source(str(path)).columns["text"][-1] == "a\u2028b"


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"task": "classification", "prompt_column": "text"}, "data.prompt_column is set but the classification task does not read it"),
        (
            {"task": "sft", "prompt_column": "text", "response_column": "label", "text_column": "text"},
            "data.text_column is set but the sft task",
        ),
        ({"label_column": "stars"}, "column 'stars' (data.label_column) does not exist in"),
    ],
)
def test_column_options_the_task_does_not_read_are_refused(tmp_path, options, fragment):
    path = write(tmp_path, "d.csv", CSV)
    with pytest.raises(DataError) as error:
        resolve_task(DataConfig(source=str(path), **options), load_source(str(path)))
    assert fragment in str(error.value)


def test_a_data_path_that_is_a_directory_or_missing_is_named(tmp_path):
    (tmp_path / "d.csv").mkdir()
    assert "data.source" in refused(tmp_path / "d.csv") and "is a directory" in refused(tmp_path / "d.csv")
    assert "does not exist" in refused(tmp_path / "e.csv")


def test_a_hub_name_while_offline_is_refused_without_trying(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="hub datasets are off"):
        load_source("someone/some-dataset")
