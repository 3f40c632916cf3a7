"""The cloud: any local Hugging Face causal LM behind an OpenAI-compatible completions endpoint.

``POST /v1/completions`` answers in OpenAI's legacy completions shape. With ``logprobs: k`` each
generated position carries its top-k tokens and their log-probabilities (``top_logprobs``), the
chosen token and its log-probability, and text offsets; never more than ``max_logprobs`` entries,
and nothing else of the model (no logits over the vocabulary, no hidden states, no weights).
``GET /v1/models`` lists the model, ``GET /health`` says it is up.

``delay_ms`` / ``jitter_ms`` slow every response on purpose (before any work, so a client that
gave up is noticed and its request skipped). A request is skipped (HTTP 499, no model work) when
its client has gone, or when it carries the header ``X-Atoll-Budget-Ms`` (atoll's edge sends its
deadline's remaining milliseconds; other clients need not) and that much time has passed since it
arrived: an answer after the deadline is unused.

Load. ``workers`` threads share the one loaded model and serve that many requests at once (more
wait their turn). Inference is thread-safe here: gradient mode is per thread (each worker runs
under ``torch.no_grad``), the model is in eval mode and its forward reads its weights without
writing them, and each request has its own KV cache. Two things are locked: the tokenizer (a
Rust tokenizer may refuse concurrent calls while its settings change) and, for a model whose
rotary embedding rewrites its frequencies during the forward (dynamic or long RoPE), the forward.

Prefix cache. With ``cache_entries`` > 0 the server keeps, least recently used first out, the KV
caches of that many recent prompts (keyed by their token ids). Prompts are then computed in
blocks of ``CACHE_BLOCK`` positions at fixed offsets (0-15, 16-31, ...), and a prompt sharing whole
blocks of token ids with a cached one starts from a copy of that cache cropped to them (at least
its last position is always computed, for its next-token distribution): a hit repeats exactly the
arithmetic of a miss, so answers are the same bit for bit whatever is cached, and an edge asking
position after position of a growing text recomputes at most a block plus the new tokens. (A
server without the cache computes a prompt in one forward; its log-probabilities may differ from
a cached server's in the last float bits.) ``/health`` reports the workers and the cache's hits
and misses.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from fastapi import Request

from atoll.hybrid.config import check_load_options
from atoll.hybrid.tokens import to_wire, token_bytes

DEFAULT_MAX_LOGPROBS = 20
BUDGET_HEADER = "X-Atoll-Budget-Ms"
CACHE_BLOCK = 16  # positions per forward over a prompt when the prefix cache is on


def _budget_s(value: str | None) -> float | None:
    """Seconds from an ``X-Atoll-Budget-Ms`` header; absent or unreadable means no budget."""
    try:
        budget = float(value) / 1000.0 if value is not None else None
    except ValueError:
        return None
    return budget if budget is not None and budget >= 0 else None


@dataclass
class CloudModel:
    """The served model, its tokenizer, and each token's wire string."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    wire: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.surface = token_bytes(self.tokenizer)
        if not self.wire:
            special = dict(zip(self.tokenizer.all_special_ids, self.tokenizer.all_special_tokens))
            self.wire = [special.get(i, to_wire(b) if b is not None else "") for i, b in enumerate(self.surface)]
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self.tokenizer_lock = threading.Lock()
        self.forward_lock = threading.Lock() if _rope_rewrites_itself(self.model.config) else contextlib.nullcontext()

    def _prompt(self, ids: list[int], cache: "PrefixCache | None"):
        """The forward over the prompt: (output, KV cache). Without a prefix cache, one forward. With
        one, positions are computed in blocks of ``cache.block`` at fixed absolute positions, starting
        after the cached prefix (a whole number of blocks): a hit then repeats exactly the
        computation a miss does, so the answer does not depend on what is cached."""
        if cache is None:
            with self.forward_lock:
                out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
            return out, out.past_key_values
        position, past = cache.lookup(ids)
        while position < len(ids):
            end = min(len(ids), (position // cache.block + 1) * cache.block)
            with self.forward_lock:
                out = self.model(input_ids=torch.tensor([ids[position:end]]), past_key_values=past, use_cache=True)
            past, position = out.past_key_values, end
        cache.store(ids, past)
        return out, past

    @torch.no_grad()
    def complete(
        self,
        prompt: str,
        max_tokens: int,
        logprobs: int | None,
        temperature: float,
        stop: list[str],
        seed: int | None,
        cache: "PrefixCache | None" = None,
    ) -> dict:
        """One choice: generated text, finish reason, and per-position top-k log-probabilities.
        With ``cache``, the prompt starts from the longest cached prefix of its token ids and its
        own KV cache is kept for later prompts."""
        with self.tokenizer_lock:
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            if self.tokenizer.bos_token_id is None:
                raise RequestError("prompt is empty and the model has no BOS token to start from", "prompt")
            ids = [self.tokenizer.bos_token_id]
        ids = ids[-max(1, self.max_positions - max_tokens) :]
        generator = torch.Generator().manual_seed(seed if seed is not None else random.randrange(2**31))
        out, past = self._prompt(ids, cache)
        generated, text, tokens, token_logprobs, top_logprobs, offsets = b"", "", [], [], [], []
        finish = "length"
        for step in range(max_tokens):
            log_probs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            if temperature == 0:
                chosen = int(torch.argmax(log_probs))
            else:
                chosen = int(torch.multinomial(torch.softmax(log_probs / temperature, dim=-1), 1, generator=generator))
            if logprobs is not None:
                top = torch.topk(log_probs, min(logprobs, log_probs.numel())) if logprobs > 0 else None
                tokens.append(self.wire[chosen])
                token_logprobs.append(float(log_probs[chosen]))
                top_logprobs.append({self.wire[int(i)]: float(v) for v, i in zip(top.values, top.indices)} if top is not None else {})
                offsets.append(len(prompt) + len(text))
            if chosen == self.tokenizer.eos_token_id:
                finish = "stop"
                break
            generated += self.surface[chosen] or b""
            text = generated.decode("utf-8", errors="replace")
            hit = next((s for s in stop if s and s in text), None)
            if hit is not None:
                text, finish = text[: text.index(hit)], "stop"
                break
            if step + 1 < max_tokens:  # the next position
                with self.forward_lock:
                    out = self.model(input_ids=torch.tensor([[chosen]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
        choice_logprobs = (
            {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
            if logprobs is not None
            else None
        )
        return {
            "text": text,
            "logprobs": choice_logprobs,
            "finish_reason": finish,
            "completion_tokens": len(tokens),
            "prompt_tokens": len(ids),
        }


def _rope_rewrites_itself(config) -> bool:
    """Whether the model's rotary embedding may rewrite its frequencies inside the forward (dynamic
    NTK or long RoPE): such a forward is not safe to run from several threads at once."""
    text = json.dumps([getattr(config, name, None) for name in ("rope_scaling", "rope_parameters", "rope_type")], default=str).lower()
    return "dynamic" in text or "longrope" in text


def _common_prefix(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = min(len(a), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """An LRU map from a prompt's token ids to the model's KV cache after them. Entries are never
    changed once stored: a request gets a copy, cropped to the whole blocks of ``block`` positions
    it shares with the entry."""

    def __init__(self, entries: int, block: int = CACHE_BLOCK):
        self.entries, self.block = entries, block
        self.items: OrderedDict[tuple[int, ...], object] = OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    def lookup(self, ids: list[int]) -> tuple[int, object | None]:
        """(n, cache): a fresh KV cache of ``ids[:n]`` from the entry sharing the longest prefix with
        ``ids``, n a multiple of ``block`` below len(ids) (the last position is always computed);
        (0, None) on a miss."""
        with self.lock:
            best_key, best = None, 0
            for key in self.items:
                shared = _common_prefix(key, ids, len(ids) - 1) // self.block * self.block
                if shared > best:
                    best_key, best = key, shared
            entry = self.items[best_key] if best_key is not None else None
            if best_key is not None:
                self.items.move_to_end(best_key)
        if entry is not None:
            try:
                past = copy.deepcopy(entry)
                if best < len(best_key):
                    past.crop(best - len(best_key))  # transformers: a negative count removes that many positions
                if past.get_seq_length() == best:
                    with self.lock:
                        self.hits += 1
                    return best, past
            except (AttributeError, RuntimeError, ValueError):
                pass  # a cache that cannot be cropped (a sliding window past its size): compute from scratch
        with self.lock:
            self.misses += 1
        return 0, None

    def store(self, ids: list[int], past) -> None:
        """Keep a copy of the KV cache of ``ids`` (the prompt's, before any generated token)."""
        kept = copy.deepcopy(past)
        with self.lock:
            self.items[tuple(ids)] = kept
            self.items.move_to_end(tuple(ids))
            while len(self.items) > self.entries:
                self.items.popitem(last=False)

    def stats(self) -> dict:
        with self.lock:
            return {"entries": self.entries, "size": len(self.items), "hits": self.hits, "misses": self.misses}


class RequestError(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _error(message: str, param: str | None = None, status: int = 400):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}, status_code=status)


def build_app(
    cloud: CloudModel,
    max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    delay_ms: float = 0.0,
    jitter_ms: float = 0.0,
    seed: int = 0,
    request_log: str | None = None,
    workers: int = 1,
    cache_entries: int = 0,
):
    """The FastAPI app. ``app.state.received`` keeps every prompt the server was sent (in memory;
    also appended to ``request_log`` as JSON lines when given): what the cloud has seen.
    ``workers`` requests run on the model at once (threads sharing it); ``cache_entries`` > 0
    keeps that many prompts' KV caches for prompts that extend them."""
    from fastapi import FastAPI

    check_load_options(workers, cache_entries)
    app = FastAPI(title="atoll cloud", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.received = []
    app.state.skipped = 0
    app.state.cache = cache = PrefixCache(cache_entries) if cache_entries > 0 else None
    threads = torch.get_num_threads()
    # the workers' own pool (not the event loop's default one), each thread on the server's torch threads
    app.state.pool = pool = ThreadPoolExecutor(
        workers, thread_name_prefix="cloud-worker", initializer=torch.set_num_threads, initargs=(threads,)
    )
    slots = asyncio.Semaphore(workers)
    log_lock = threading.Lock()
    delays = random.Random(seed)
    counter = iter(range(1, 1 << 62))

    def record(prompt: str) -> None:
        app.state.received.append(prompt)
        if request_log:
            with log_lock, open(request_log, "a") as handle:
                handle.write(json.dumps({"prompt": prompt, "time": time.time()}) + "\n")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": cloud.name, "workers": workers, "cache": cache.stats() if cache else None}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": cloud.name, "object": "model", "created": 0, "owned_by": "atoll"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error("the request body is not valid JSON")
        if not isinstance(body, dict):
            return _error("the request body must be a JSON object")
        try:
            prompts, max_tokens, logprobs, temperature, stop, request_seed = _parse(body, max_logprobs)
        except RequestError as error:
            return _error(str(error), error.param)
        arrived = time.perf_counter()
        budget_s = _budget_s(request.headers.get(BUDGET_HEADER))
        for prompt in prompts:
            record(prompt)
        delay = (delay_ms + delays.uniform(0, jitter_ms)) / 1000.0
        if delay > 0:
            await asyncio.sleep(delay)
        async with slots:  # a free worker
            too_late = budget_s is not None and time.perf_counter() - arrived > budget_s
            if too_late or await request.is_disconnected():  # the client gave up (deadline): skip the work
                app.state.skipped += 1
                return _error("client disconnected", status=499)
            loop = asyncio.get_running_loop()
            try:
                results = [
                    await loop.run_in_executor(pool, cloud.complete, p, max_tokens, logprobs, temperature, stop, request_seed, cache)
                    for p in prompts
                ]
            except RequestError as error:
                return _error(str(error), error.param)
        usage = {
            "prompt_tokens": sum(r["prompt_tokens"] for r in results),
            "completion_tokens": sum(r["completion_tokens"] for r in results),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {
            "id": f"cmpl-{next(counter)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": cloud.name,
            "choices": [
                {"index": i, "text": r["text"], "logprobs": r["logprobs"], "finish_reason": r["finish_reason"]}
                for i, r in enumerate(results)
            ],
            "usage": usage,
        }

    return app


def _parse(body: dict, max_logprobs: int) -> tuple[list[str], int, int | None, float, list[str], int | None]:
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise RequestError("prompt must be a string or a non-empty list of strings (token-id prompts are not supported)", "prompt")
    max_tokens = body.get("max_tokens", 16)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 4096:
        raise RequestError("max_tokens must be an integer from 1 to 4096", "max_tokens")
    logprobs = body.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or not 0 <= logprobs <= max_logprobs):
        raise RequestError(f"logprobs must be an integer from 0 to {max_logprobs}", "logprobs")
    temperature = body.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise RequestError("temperature must be a number from 0 to 2", "temperature")
    for key, allowed in (("n", 1), ("best_of", 1), ("top_p", 1)):
        if body.get(key, allowed) != allowed:
            raise RequestError(f"{key} other than {allowed} is not supported by this server", key)
    for key in ("echo", "stream"):
        if body.get(key, False):
            raise RequestError(f"{key} is not supported by this server", key)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("stop must be a string or a list of strings", "stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError("seed must be an integer", "seed")
    return prompts, max_tokens, logprobs, float(temperature), stop, seed


class BackgroundServer:
    """A uvicorn server for ``app`` on a loopback port, in a thread (tests, ``eval``, benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off", ws="none"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.host = host

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the cloud server did not start")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        pool = getattr(getattr(self.server.config.app, "state", None), "pool", None)
        if pool is not None:
            pool.shutdown(wait=False)
