"""The deadline: a cloud slowed on purpose never holds a token past the deadline; the edge token
stands and the miss is counted. A prompt with personal data never reaches the server."""

from __future__ import annotations

import asyncio

import pytest

from atoll.hybrid.client import CloudClient
from atoll.hybrid.config import FusionConfig
from atoll.hybrid.decoding import HybridDecoder
from atoll.hybrid.edge import EdgeModel
from atoll.hybrid.loading import load_causal_lm
from atoll.hybrid.privacy import CloudView, PrivacyDetector
from atoll.hybrid.vocab import EdgeVocabulary

PROMPT = "What is this text about? rain storm the"


@pytest.fixture(scope="module")
def edge(tiny_pair):
    model, tokenizer = load_causal_lm(str(tiny_pair["edge"]))
    return EdgeModel(model, tokenizer)


def _decode(edge, url: str, method: str, deadline_ms: float, tokens: int, prompt: str = PROMPT, policy: str = "edge_only"):
    async def main():
        client = CloudClient(url, "tiny-cloud", top_k=5)
        try:
            decoder = HybridDecoder(edge, EdgeVocabulary(edge.tokenizer), client, FusionConfig(), deadline_ms)
            view = CloudView(PrivacyDetector(), policy, prompt)
            return await decoder.decode(prompt, method, tokens, view=view), client.requests
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_slow_cloud_misses_every_deadline_and_the_edge_tokens_stand(edge, cloud_server):
    server = cloud_server(delay_ms=400)
    slow, requests = _decode(edge, server.url, "cloud", deadline_ms=60, tokens=4)
    assert requests == 4
    assert [r.missed for r in slow.records] == [True] * 4 and not any(r.fused for r in slow.records)
    assert all(r.latency_s < 0.4 for r in slow.records)  # nobody waited for the 400 ms answers
    edge_only, _ = _decode(edge, server.url, "edge", deadline_ms=60, tokens=4)
    assert [r.token_id for r in slow.records] == [r.token_id for r in edge_only.records]


def test_fast_cloud_is_fused_and_changes_the_tokens(edge, cloud_server):
    server = cloud_server()
    fused, requests = _decode(edge, server.url, "cloud", deadline_ms=10_000, tokens=6)
    assert requests == 6 and all(r.fused and not r.missed for r in fused.records)
    edge_only, _ = _decode(edge, server.url, "edge", deadline_ms=10_000, tokens=6)
    assert [r.token_id for r in fused.records] != [r.token_id for r in edge_only.records]
    # what the server saw: the prompt, then the prompt plus each token emitted so far
    received = server.app.state.received
    assert received[0] == PROMPT and all(r.startswith(PROMPT) for r in received)
    assert len({len(r) for r in received}) == len(received)


def test_planted_personal_data_never_reaches_the_server(edge, cloud_server):
    server = cloud_server()
    secret = "Hi, I'm Maria Gonzalez, call (415) 555-0132 or mail maria.gonzalez@example.com. What is this text about?"
    kept, requests = _decode(edge, server.url, "weighted", 10_000, 3, prompt=secret, policy="edge_only")
    assert requests == 0 and not any(r.cloud_asked for r in kept.records)
    redacted, requests = _decode(edge, server.url, "weighted", 10_000, 3, prompt=secret, policy="redact")
    assert requests == 3
    received = server.app.state.received
    assert len(received) == 3
    for value in ("Maria", "Gonzalez", "555-0132", "maria.gonzalez@example.com", "example.com"):
        assert not any(value in prompt for prompt in received)
    assert received[0].startswith("Hi, I'm [PERSON], call [PHONE] or mail [EMAIL].")
