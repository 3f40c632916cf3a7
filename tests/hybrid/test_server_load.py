"""serve-cloud under load, on a real loopback server: several workers sharing one model answer
concurrent requests exactly as one worker answers them in turn; the prompt-prefix KV cache
answers a prompt that extends (or shares a prefix with) a cached one exactly as a fresh
computation does, and /health counts its hits and misses; bad values are one-line errors."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import torch
import yaml
from typer.testing import CliRunner

from atoll.cli import app

PROMPTS = [
    "What is this text about? rain storm",
    "What is this text about? pizza bread",
    "Contact me at someone@example.org",
    "rain",
    "What is this text about? rain storm cloud and wind",
    "the weather is",
]


def body(prompt: str, max_tokens: int = 3) -> dict:
    return {"model": "tiny-cloud", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 5}


def choices(reply: httpx.Response) -> list[dict]:
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"]


class Gate:
    """The served model behind a gate that records how many requests are inside it at once and,
    with a barrier, holds each until ``parties`` are inside together (BrokenBarrierError if they
    never are)."""

    def __init__(self, cloud, parties: int | None = None):
        self.cloud, self.name = cloud, cloud.name
        self.barrier = threading.Barrier(parties, timeout=60) if parties else None
        self.lock = threading.Lock()
        self.inside = self.peak = 0

    def complete(self, *args):
        with self.lock:
            self.inside += 1
            self.peak = max(self.peak, self.inside)
        try:
            if self.barrier is not None:
                self.barrier.wait()
            return self.cloud.complete(*args)
        finally:
            with self.lock:
                self.inside -= 1


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as http:
        return await asyncio.gather(*(http.post(f"{url}/completions", json=b) for b in bodies))


def served(cloud_server, model, **options):
    """A server from ``build_app(model, ...)`` (the fixture builds from the shared model)."""
    from atoll.hybrid.server import BackgroundServer, build_app

    application = build_app(model, **options)
    server = BackgroundServer(application).__enter__()
    server.app = application
    cloud_server.started.append(server)
    return server


@pytest.fixture
def servers(cloud_server):
    """Like ``cloud_server``, for any object with the served model's interface (a Gate)."""
    started = []
    cloud_server.started = started
    yield cloud_server
    for server in started:
        server.__exit__(None, None, None)


def test_concurrent_requests_on_several_workers_return_exactly_what_sequential_ones_do(servers, cloud_model):
    one = Gate(cloud_model)
    sequential = served(servers, one)
    expected = [choices(httpx.post(f"{sequential.url}/completions", json=body(p), timeout=120)) for p in PROMPTS]
    assert one.peak == 1
    two = Gate(cloud_model, parties=2)  # every request waits until a second one is on the model with it
    concurrent = served(servers, two, workers=2)
    replies = asyncio.run(post_all(concurrent.url, [body(p) for p in PROMPTS]))
    assert [choices(r) for r in replies] == expected
    assert two.peak == 2
    health = httpx.get(concurrent.url.removesuffix("/v1") + "/health", timeout=30).json()
    assert health["workers"] == 2 and health["cache"] is None


LONG = "What is this text about? rain storm cloud and wind over the hills, then rain again and a storm"


def test_a_prefix_cache_hit_returns_exactly_the_top_k_of_a_miss_and_counts_it(cloud_server, cloud_model):
    """Each answer of the caching server equals, bit for bit, a computation from an empty cache
    (a miss by construction); after the first prompt every one is a hit (whole shared blocks)."""
    import json

    from atoll.hybrid.server import PrefixCache

    cached = cloud_server(cache_entries=4)
    health_url = cached.url.removesuffix("/v1") + "/health"
    prompts = [LONG, LONG + " cloud", LONG[:-5] + "sun and rain", LONG + " cloud"]  # extends, diverges late, repeats
    assert len(cloud_model.tokenizer(LONG)["input_ids"]) > 2 * 16  # shares whole blocks of CACHE_BLOCK positions
    for prompt in prompts:
        empty = PrefixCache(1)
        want = json.loads(json.dumps(cloud_model.complete(prompt, 3, 5, 0.0, [], 0, empty)["logprobs"]))
        assert empty.stats()["misses"] == 1
        (got,) = choices(httpx.post(f"{cached.url}/completions", json=body(prompt), timeout=120))
        assert got["logprobs"] == want, prompt  # tokens and every log-probability, bit for bit
    cache = httpx.get(health_url, timeout=30).json()["cache"]
    assert cache == {"entries": 4, "size": 3, "hits": 3, "misses": 1}


def test_the_prefix_cache_reuses_whole_shared_blocks_and_forgets_the_least_recently_used(cloud_model):
    from atoll.hybrid.server import PrefixCache

    cache = PrefixCache(2, block=4)
    ids = cloud_model.tokenizer(LONG)["input_ids"]
    other = cloud_model.tokenizer(PROMPTS[2])["input_ids"]  # shares less than a block with LONG
    for prompt in (ids[:9], ids, other):
        with torch.no_grad():
            cloud_model._prompt(prompt, cache)  # the prompt's forward, in blocks, stored
    assert list(cache.items) == [tuple(ids), tuple(other)]  # the oldest went first
    start, past = cache.lookup(ids[:10] + [ids[0]])
    assert start == 8 and past.get_seq_length() == 8  # 10 shared positions: two whole blocks, cropped
    assert cache.lookup(ids)[0] == (len(ids) - 1) // 4 * 4  # the same prompt again: its last position is recomputed
    assert cache.lookup(ids[:3])[0] == 0 and cache.stats()["misses"] == 3  # less than a block shared: a miss (the third)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--workers", "0"], "--workers must be an integer from 1 to 64"),
        (["--workers", "65"], "--workers must be an integer from 1 to 64"),
        (["--cache-entries", "-1"], "--cache-entries must be an integer from 0 to"),
    ],
)
def test_bad_worker_and_cache_values_are_one_line_errors(args, fragment):
    result = CliRunner().invoke(app, ["hybrid", "serve-cloud", "no-such-model", *args])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize(
    "cloud, fragment",
    [
        ({"serve": True, "serve_workers": 0}, "cloud.serve_workers"),
        ({"serve": True, "serve_cache_entries": -3}, "cloud.serve_cache_entries"),
        ({"url": "http://127.0.0.1:9/v1", "serve_workers": 2}, "cloud.serve_workers has no effect without cloud.serve: true"),
    ],
)
def test_bad_eval_cloud_load_settings_are_one_line_errors(tmp_path, cloud, fragment):
    path = tmp_path / "hybrid.yaml"
    path.write_text(yaml.safe_dump({"cloud": cloud, "run": {"root": str(tmp_path / "runs")}}))
    result = CliRunner().invoke(app, ["hybrid", "eval", str(path)])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "runs").exists()
