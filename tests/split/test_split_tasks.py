"""Tasks across the cut: SQuAD-format question answering (reading, answer spans, metrics), several
data parties sharing one model party, and frozen or fully tuned slices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atoll.errors import DataError
from atoll.split.qa import best_span, exact_match, normalize_answer, read_squad, token_f1, tokenize_qa
from atoll.split.runner import connect
from atoll.split.setup import prepare

HANDMADE = Path(__file__).resolve().parents[2] / "configs" / "split" / "data" / "qa-handmade.json"


def test_squad_metrics_by_hand():
    assert normalize_answer("The  Salt Road!") == "salt road"
    assert exact_match("the salt road", ["The Salt Road"]) == 1.0
    assert exact_match("salt", ["The Salt Road"]) == 0.0
    # prediction "salt road trip" vs gold "salt road": precision 2/3, recall 1, F1 0.8
    assert token_f1("salt road trip", ["The Salt Road", "Salt"]) == pytest.approx(0.8)
    assert token_f1("bread", ["salt road"]) == 0.0
    spans = np.array([[-1, -1], [0, 3], [4, 8], [9, 12], [-1, -1]])
    start = np.array([9.0, 0.0, 5.0, 1.0, 9.0])
    end = np.array([9.0, 0.0, 1.0, 4.0, 9.0])
    assert best_span(start, end, spans, 30) == (2, 3)  # question/padding tokens are never chosen
    assert best_span(start, end, spans, 1) == (2, 2)


def test_squad_files_are_read_and_spans_found(tmp_path):
    examples = read_squad(HANDMADE)
    assert len(examples) == 64 and examples[0].answers == ["Alan Stevens"]
    from atoll.models.registry import load_tokenizer

    tokenizer = load_tokenizer("minilm", lambda: [], tmp_path)
    data = tokenize_qa(examples, tokenizer, 96)
    assert data.dropped == 0
    for index in range(len(data)):
        example = data.examples[index]
        spans = data.char_spans[index]
        text = example.context[spans[data.starts[index]][0] : spans[data.ends[index]][1]]
        assert normalize_answer(text) == normalize_answer(example.answers[0])
    rows = [{"context": "Bees dance.", "question": "What do bees do?", "answers": {"text": ["dance"], "answer_start": [5]}}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert read_squad(tmp_path / "rows.jsonl")[0].answer_start == 5
    rows[0]["answers"]["answer_start"] = [3]
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="is not at character 3"):
        read_squad(tmp_path / "bad.json")


def test_question_answering_trains_across_the_cut(split_config):
    """tiny-bert with a span head, head-body-tail: the loss on the training questions falls."""
    setup = prepare(
        split_config(
            **{
                "model.name": "tiny-bert",
                "data.task": "qa",
                "data.source": str(HANDMADE),
                "data.max_examples": "null",
                "data.test_size": 0.25,
                "model.max_length": 96,
                "split.partition": "head-body-tail",
                "split.head_blocks": 0,
                "split.tail_blocks": 1,
                "split.slices.head.tuning": "full",
                "train.lr": 0.005,
            }
        )
    )
    assert setup.head == "question-answering" and len(setup.test_indices) == 16  # 8 of 32 contexts, 2 questions each
    test_contexts = {setup.data.data.examples[i].context for i in setup.test_indices}
    assert not any(setup.data.data.examples[i].context in test_contexts for i in setup.party_indices[0])
    session = connect(setup, None)
    party = session.parties[0]
    losses = [party.train_step()["loss"] for _ in range(12)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    from atoll.split.runner import evaluate_party

    metrics = evaluate_party(session, party)
    assert set(metrics) >= {"exact_match", "f1", "loss"} and 0 <= metrics["f1"] <= 1


def test_several_data_parties_share_one_model_party(split_config):
    setup = prepare(split_config(**{"split.data_parties": 3, "record.every": 1, "record.limit": 2}))
    assert sorted(np.concatenate(setup.party_indices).tolist()) == sorted(set(np.concatenate(setup.party_indices).tolist()))
    session = connect(setup, None)
    for _ in range(2):
        for party in session.parties:
            party.train_step()
    model_party = session.model_party
    assert model_party.steps == 6 and model_party.state.parties == {0, 1, 2}
    order = [(m.party, m.kind) for m in model_party.transcript.messages]
    assert order[:6] == [(0, "forward"), (0, "backward"), (1, "forward"), (1, "backward"), (2, "forward"), (2, "backward")]
    heads = [p.model.trainable["head"][1].detach() for p in session.parties]  # a lora_B of each party's head
    assert not np.allclose(heads[0].numpy(), heads[1].numpy())  # each data party keeps its own head


def test_a_frozen_head_asks_for_no_gradients_back(split_config):
    setup = prepare(split_config(**{"split.slices.head.tuning": "frozen"}))
    session = connect(setup, None)
    session.parties[0].train_step()
    traffic = session.channels[0].traffic
    assert session.parties[0].model.parameters() == []
    assert traffic.to_data["backward"] < 200  # an empty reply: no activation gradients travel back
    assert session.model_party.steps == 1


def test_a_second_data_party_with_another_cut_is_refused(split_config):
    from atoll.split.channel import SplitProtocolError

    setup = prepare(split_config())
    session = connect(setup, None)
    facts = dict(setup.hello_facts(), head_blocks=0)
    with pytest.raises(SplitProtocolError, match="head_blocks=0, the model party head_blocks=1"):
        session.channels[0].call("hello", {}, {"party": 1, **facts})


def test_generation_metrics_come_from_split_generation(split_config, monkeypatch):
    """GSM8K: real greedy generation across the cut runs; an oracle that generates the reference
    answers scores exact match 1 and ROUGE-L 1 (so the metric reads the generated tokens)."""
    import torch

    from atoll.split.runner import generation_metrics

    setup = prepare(
        split_config(
            **{
                "data.source": "gsm8k",
                "data.max_examples": 40,
                "data.test_size": 8,
                "model.max_length": 256,
                "eval.max_generate": 3,
                "eval.max_new_tokens": 5,
            }
        )
    )
    session = connect(setup, None)
    party = session.parties[0]
    real = generation_metrics(session, party)
    assert real["generated"] == 3.0 and 0.0 <= real["exact_match"] <= 1.0
    # the 3 prompts are one batch: a prefill gives token 1, 4 one-position steps give tokens 2..5, then "end"
    assert session.channels[0].traffic.messages["generate"] == 6
    data = setup.data.data

    def oracle(input_ids, attention_mask, max_new_tokens, eos_id, pad_id):
        rows = [torch.from_numpy(data.sequence(i)[int(data.prompt_len[i]) :].astype("int64")) for i in setup.test_indices[: len(input_ids)]]
        width = max(len(r) for r in rows)
        return torch.stack([torch.cat([r, torch.full((width - len(r),), pad_id)]) for r in rows])

    monkeypatch.setattr(party, "generate", oracle)
    perfect = generation_metrics(session, party)
    assert perfect["exact_match"] == 1.0 and perfect["generation_rouge_l"] == 1.0
