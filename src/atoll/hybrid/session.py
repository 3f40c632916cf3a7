"""What ``eval`` and ``chat`` share: the edge model, the cloud endpoint (given, or launched as an
``atoll hybrid serve-cloud`` subprocess on a loopback port), the client, the privacy detector.
Everything that can fail because of user input fails in ``open_session``, before a run directory exists.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from atoll.hybrid.config import HybridConfig
from atoll.hybrid.client import CloudClient, CloudError
from atoll.hybrid.decoding import HybridDecoder
from atoll.hybrid.edge import EdgeModel
from atoll.hybrid.privacy import PrivacyDetector
from atoll.hybrid.vocab import EdgeVocabulary

LAUNCH_TIMEOUT_S = 180.0


@dataclass
class Session:
    config: HybridConfig
    edge: EdgeModel
    vocab: EdgeVocabulary
    client: CloudClient | None
    detector: PrivacyDetector
    decoder: HybridDecoder
    cloud_url: str | None
    launched: "LaunchedCloud | None" = None

    async def server_health(self) -> dict | None:
        """The launched cloud's /health (workers, prefix-cache hits and misses); None for a cloud
        given by URL (not every server has one)."""
        if self.launched is None:
            return None
        import httpx

        async with httpx.AsyncClient(timeout=30) as http:
            return (await http.get(self.launched.url.removesuffix("/v1") + "/health")).json()


class LaunchedCloud:
    """``atoll hybrid serve-cloud`` in a child process on a free loopback port; stopped by its PID."""

    def __init__(self, model: str, delay_ms: float, jitter_ms: float, threads: int, seed: int, workers: int = 1, cache_entries: int = 0):
        command = [sys.executable, "-m", "atoll", "hybrid", "serve-cloud", model, "--host", "127.0.0.1", "--port", "0"]
        command += ["--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms), "--threads", str(threads), "--seed", str(seed)]
        command += ["--workers", str(workers), "--cache-entries", str(cache_entries)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.url = self._read_url()

    def _read_url(self) -> str:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.5)
            if ready:
                line = self.process.stdout.readline()
                if line.startswith("serving ") and " at " in line:
                    return line.rsplit(" at ", 1)[1].strip()
            if self.process.poll() is not None:
                error = (self.process.stderr.read() or "").strip().splitlines()
                raise CloudError(f"the cloud server did not start: {error[-1] if error else 'exited'}", "check cloud.model")
        self.stop()
        raise CloudError(f"the cloud server did not start within {LAUNCH_TIMEOUT_S:.0f} s", "check cloud.model")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream:
                stream.close()


@asynccontextmanager
async def open_session(config: HybridConfig):
    """Load the edge, reach (or launch) the cloud and check it answers with log-probabilities."""
    import torch

    from atoll.hybrid.loading import edge_source, load_causal_lm

    torch.set_num_threads(config.run.threads)
    detector = PrivacyDetector(config.privacy)
    edge_model, adapter = edge_source(config.edge)
    model, tokenizer = load_causal_lm(edge_model, config.edge.dtype, adapter)
    edge = EdgeModel(model, tokenizer)
    vocab = EdgeVocabulary(tokenizer, config.cloud.eos_strings, config.fusion.unshared)
    needs_cloud = any(method != "edge" for method in config.fusion.methods)
    launched = client = None
    try:
        url = config.cloud.url
        if needs_cloud and config.cloud.serve:
            launched = await asyncio.to_thread(
                LaunchedCloud,
                config.cloud.model,
                config.cloud.serve_delay_ms,
                config.cloud.serve_jitter_ms,
                config.run.threads,
                config.seed,
                config.cloud.serve_workers,
                config.cloud.serve_cache_entries,
            )
            url = launched.url
        if needs_cloud:
            client = CloudClient(url, config.cloud.model, config.cloud.top_k, config.cloud.timeout_s, config.cloud.api_key_env)
            top = await client.next_token("Hello")  # reachable, and answers with log-probabilities
            if not top:
                raise CloudError(f"the cloud at {url} returned no top log-probabilities", "the server must support logprobs")
            client.bytes_sent = client.bytes_received = client.requests = 0
        decoder = HybridDecoder(edge, vocab, client, config.fusion, config.cloud.deadline_ms)
        yield Session(config, edge, vocab, client, detector, decoder, url if needs_cloud else None, launched)
    finally:
        if client is not None:
            await client.aclose()
        if launched is not None:
            await asyncio.to_thread(launched.stop)
