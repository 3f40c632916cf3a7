"""The edge's client of any OpenAI-compatible completions server that returns log-probabilities
(atoll's own ``serve-cloud``, vLLM, ...): one request per position, ``max_tokens: 1``,
``temperature: 0``, ``logprobs: k``; the answer is the first position's ``top_logprobs``.

It counts what crosses the wire: bytes of every HTTP request (request line, headers, body) and
response (status line, headers, body).
"""

from __future__ import annotations

import json
import os

import httpx

from atoll.errors import AtollError

BUDGET_HEADER = "X-Atoll-Budget-Ms"  # the same name as atoll.hybrid.server's (kept apart: the client imports no server code)


class CloudError(AtollError):
    """The cloud cannot be reached or answers something that is not a completions response."""

    kind = "cloud error"


class CloudClient:
    """Asks a completions endpoint for next-token top-k log-probabilities, asynchronously."""

    def __init__(self, url: str, model: str, top_k: int, timeout_s: float = 30.0, api_key_env: str | None = None):
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise CloudError(
                    f"cloud.api_key_env names '{api_key_env}' but that environment variable is empty", "export it or unset the key"
                )
            headers["Authorization"] = f"Bearer {key}"
        self.url = url.rstrip("/")
        self.model = model
        self.top_k = top_k
        self.bytes_sent = 0
        self.bytes_received = 0
        self.requests = 0
        self.http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),  # room for abandoned late requests
            event_hooks={"request": [self._count_request], "response": [self._count_response]},
        )

    async def _count_request(self, request: httpx.Request) -> None:
        line = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
        headers = sum(len(k) + len(v) + 4 for k, v in request.headers.raw)
        self.bytes_sent += len(line) + headers + 2 + len(request.content)
        self.requests += 1

    async def _count_response(self, response: httpx.Response) -> None:
        await response.aread()
        headers = sum(len(k) + len(v) + 4 for k, v in response.headers.raw)
        self.bytes_received += len(f"HTTP/1.1 {response.status_code}\r\n") + headers + 2 + len(response.content)

    async def next_token(self, text: str, budget_ms: float | None = None) -> list[tuple[str, float]]:
        """The cloud's top-k (token string, log-probability) for the position after ``text``; with
        ``budget_ms``, the server is told when the answer stops being useful (atoll's server then
        skips the work; other servers ignore the header)."""
        body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0, "logprobs": self.top_k}
        headers = {BUDGET_HEADER: f"{budget_ms:.1f}"} if budget_ms is not None else None
        try:
            response = await self.http.post("/completions", json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise CloudError(
                f"cannot reach the cloud at {self.url} ({type(exc).__name__})", "start it with `atoll hybrid serve-cloud`"
            ) from None
        if response.status_code != 200:
            raise CloudError(
                f"the cloud at {self.url} answered HTTP {response.status_code}: {_message(response)}", "check cloud.url and cloud.top_k"
            )
        return parse_top_logprobs(response.content, self.top_k)

    async def aclose(self) -> None:
        await self.http.aclose()


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])[:200]
    except Exception:
        return response.text[:200]


def parse_top_logprobs(content: bytes, top_k: int) -> list[tuple[str, float]]:
    """The first position's top log-probabilities from an OpenAI completions response: a dict
    {token: logprob} (OpenAI, vLLM) or a list of {token, logprob} objects; at most ``top_k``,
    best first."""
    try:
        data = json.loads(content)
        top = data["choices"][0]["logprobs"]["top_logprobs"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise CloudError("the cloud's answer has no choices[0].logprobs.top_logprobs[0]", "the server must return logprobs") from None
    if isinstance(top, dict):
        pairs = list(top.items())
    elif isinstance(top, list):
        pairs = [(item.get("token"), item.get("logprob")) for item in top if isinstance(item, dict)]
    else:
        raise CloudError("the cloud's top_logprobs is neither an object nor a list", "the server must follow the OpenAI shape")
    cleaned = [(str(token), float(value)) for token, value in pairs if isinstance(token, str) and isinstance(value, (int, float))]
    cleaned.sort(key=lambda pair: -pair[1])
    return cleaned[:top_k]
