"""The math task's generate -> extract -> exact-match chain, on constructed generations whose
right answers are known: the model's ``generate`` replays a scripted continuation for each
question (its forward pass, used for the answer loss, is a real tiny Llama's), so every step after
generation (slicing off the prompt, decoding without special tokens, strict and flexible answer
extraction, comparison with the gold ``#### N`` of the data, the mean over the questions answered)
is checked against hand-counted results."""

from __future__ import annotations

import pytest
import torch

from helpers import evaluate_math, math_task

# (question, gold worked answer, what the model "generates", strict right?, flexible right?)
CASES = [
    ("Ann has 3 apples and buys 15 more. How many?", "3 + 15 = <<3+15=18>>18\n#### 18", " 3 + 15 = 18\n#### 18", True, True),
    ("A pen costs 4 dollars. What do 5 pens cost?", "4 * 5 = 20\n#### 20", " 4 * 5 = 21\n#### 21", False, False),
    ("Bo runs 6 km a day for 7 days. Total?", "6 * 7 = 42\n#### 42", " he runs 6 * 7 = 42 km", False, True),
    ("Cy had 10 cards and lost 3. Left?", "10 - 3 = 7\n#### 7", " 10 - 3 = 7\n#### 7 and then 12 more", True, True),
    ("A box holds 1,200 nails; 34 are used. Left?", "1,200 - 34 = 1166\n#### 1,166", " 1200 - 34\n#### 1,166.", True, True),
    ("Dee owes 5 and pays 12. Balance?", "5 - 12 = -7\n#### -7", " #### 7", False, False),
    ("Eve saw 99 birds. How many birds?", "#### 99", " I do not know", False, False),  # 99 only in the prompt
    ("Fay has 8 cats and 9 dogs. How many pets?", "8 + 9 = 17\n#### 17", " 8 + 9 = 17 so 17 pets\n#### 17\n\nQuestion: 25", True, True),
    ("Gus reads 2 books a week for 3 weeks. How many?", "#### 6", " 2 * 3 = 6 #### 5 or maybe 6", False, False),
]


class ScriptedGenerate:
    """Stands in for ``model.generate``: each left-padded prompt followed by its scripted
    continuation and end-of-sequence, padded on the right as Hugging Face's generate pads."""

    def __init__(self, task, continuations: dict[tuple[int, ...], str]):
        self.task = task
        self.continuations = continuations
        self.calls = 0

    def __call__(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, do_sample, **_):
        assert do_sample is False, "greedy decoding"
        self.calls += 1
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = tuple(token for token, keep in zip(ids, mask, strict=True) if keep)
            new = self.task.tokenizer(self.continuations[prompt], add_special_tokens=False)["input_ids"]
            rows.append(ids + (new + [eos_token_id])[:max_new_tokens])
        width = max(len(row) for row in rows)
        return torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    task = math_task([{"question": q, "answer": a} for q, a, *_ in CASES], tmp_path_factory.mktemp("math"))
    data = task.data
    prompts = [tuple(int(t) for t in data.sequence(i)[: data.prompt_len[i]]) for i in range(len(data))]
    assert len(set(prompts)) == len(CASES)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=len(task.tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=task.tokenizer.pad_token_id,
        eos_token_id=task.tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    generate = ScriptedGenerate(task, {prompt: case[2] for prompt, case in zip(prompts, CASES, strict=True)})
    model.generate = generate
    return model, task, generate


def test_the_gold_answers_are_the_numbers_after_the_marks(scripted):
    _, task, _ = scripted
    assert task.data.answers == ["18", "20", "42", "7", "1166", "-7", "99", "17", "6"]


@pytest.mark.parametrize("batch_size", [4, 16])
def test_exact_match_counts_the_strict_and_the_flexible_answers_that_equal_the_gold_ones(scripted, batch_size):
    model, task, generate = scripted
    calls = generate.calls
    metrics = evaluate_math(model, task, batch_size=batch_size, max_generate=len(CASES), max_new_tokens=64)
    assert metrics["generated"] == len(CASES)
    assert metrics["exact_match"] == pytest.approx(sum(case[3] for case in CASES) / len(CASES))  # 4 / 9
    assert metrics["exact_match_flexible"] == pytest.approx(sum(case[4] for case in CASES) / len(CASES))  # 5 / 9
    assert generate.calls - calls == -(-len(CASES) // batch_size), "one generate call per batch of prompts"
    assert metrics["loss"] > 0 and metrics["examples"] == len(CASES)


def test_only_the_first_max_generate_questions_are_answered(scripted):
    model, task, _ = scripted
    metrics = evaluate_math(model, task, batch_size=8, max_generate=3, max_new_tokens=64)
    assert metrics["generated"] == 3
    assert metrics["exact_match"] == pytest.approx(1 / 3) and metrics["exact_match_flexible"] == pytest.approx(2 / 3)


def test_an_answer_cut_by_max_new_tokens_is_not_credited(scripted):
    model, task, _ = scripted
    # the first case needs its '#### 18' at the end: a few tokens in, it is not there yet
    metrics = evaluate_math(model, task, batch_size=8, max_generate=1, max_new_tokens=4)
    assert metrics["exact_match"] == 0.0
