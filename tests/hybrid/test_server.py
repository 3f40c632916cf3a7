"""The cloud service on a real loopback server: OpenAI's completions shape, the top-k it returns
(and nothing more), and refusals of what it does not do."""

from __future__ import annotations

import httpx
import pytest
import torch

from atoll.hybrid.tokens import from_wire

RESPONSE_KEYS = {"id", "object", "created", "model", "choices", "usage"}
CHOICE_KEYS = {"index", "text", "logprobs", "finish_reason"}
LOGPROB_KEYS = {"tokens", "token_logprobs", "top_logprobs", "text_offset"}


def test_completions_return_exactly_the_models_top_k(cloud_server, cloud_model):
    server = cloud_server(max_logprobs=5)
    prompt = "What is this text about? rain storm"
    body = {"model": "tiny-cloud", "prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 4}
    reply = httpx.post(f"{server.url}/completions", json=body, timeout=30).json()
    assert set(reply) == RESPONSE_KEYS and reply["object"] == "text_completion"
    (choice,) = reply["choices"]
    assert set(choice) == CHOICE_KEYS
    logprobs = choice["logprobs"]
    assert set(logprobs) == LOGPROB_KEYS
    assert all(len(top) == 4 for top in logprobs["top_logprobs"])
    assert len(logprobs["top_logprobs"]) == reply["usage"]["completion_tokens"] <= 3
    # position 0's top-4 are the model's own top-4 next tokens, with their log-probabilities
    ids = cloud_model.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        expected = torch.log_softmax(cloud_model.model(torch.tensor([ids])).logits[0, -1], dim=-1)
    values, indices = torch.topk(expected, 4)
    served = logprobs["top_logprobs"][0]
    want = {cloud_model.surface[int(i)] or cloud_model.wire[int(i)].encode(): float(v) for v, i in zip(values, indices, strict=True)}
    got = {from_wire(k) or k.encode(): v for k, v in served.items()}
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-4)
    # greedy: the chosen token is the top one
    assert logprobs["token_logprobs"][0] == pytest.approx(float(values[0]), abs=1e-4)


def test_more_than_max_logprobs_is_refused(cloud_server):
    server = cloud_server(max_logprobs=5)
    reply = httpx.post(f"{server.url}/completions", json={"prompt": "a", "max_tokens": 1, "logprobs": 6}, timeout=30)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "logprobs"


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": [1, 2, 3]},
        {"prompt": "a", "echo": True},
        {"prompt": "a", "stream": True},
        {"prompt": "a", "n": 2},
        {"prompt": "a", "max_tokens": 0},
    ],
)
def test_unsupported_requests_get_an_openai_error(cloud_server, body):
    server = cloud_server()
    reply = httpx.post(f"{server.url}/completions", json=body, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"


def test_without_logprobs_no_logprobs_are_returned_and_models_lists_the_model(cloud_server):
    server = cloud_server()
    reply = httpx.post(f"{server.url}/completions", json={"prompt": "rain", "max_tokens": 2, "temperature": 0}, timeout=30).json()
    assert reply["choices"][0]["logprobs"] is None
    assert httpx.get(f"{server.url}/models", timeout=30).json()["data"][0]["id"] == "tiny-cloud"
    assert server.app.state.received == ["rain"]


def test_a_request_past_its_budget_is_skipped_without_model_work(cloud_server):
    """The edge's X-Atoll-Budget-Ms: an answer that would arrive after the deadline is not computed."""
    server = cloud_server(delay_ms=100)
    body = {"prompt": "a", "max_tokens": 1, "logprobs": 2}
    late = httpx.post(f"{server.url}/completions", json=body, headers={"X-Atoll-Budget-Ms": "20"}, timeout=30)
    in_time = httpx.post(f"{server.url}/completions", json=body, headers={"X-Atoll-Budget-Ms": "5000"}, timeout=30)
    unbudgeted = httpx.post(f"{server.url}/completions", json=body, timeout=30)
    assert late.status_code == 499 and server.app.state.skipped == 1
    assert in_time.status_code == 200 and unbudgeted.status_code == 200
