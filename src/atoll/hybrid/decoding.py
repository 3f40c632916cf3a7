"""Token-by-token hybrid decoding under a deadline.

For every position the edge sends the text so far to the cloud (asynchronously) and computes its
own distribution at the same time. The cloud's answer is awaited until ``deadline`` after the
position started; if it is not there by then (or the call failed), the edge's own token stands and
the miss is counted. Generation never waits on the cloud past the deadline; a position takes
max(edge time, min(cloud time, deadline)) plus the fusion.

A late request is abandoned, not cancelled: cancelling an httpx request mid-flight can leave its
pooled connection checked out for good, and after enough misses every later request waited for a
free connection and missed too (measured: the fused share fell to 0 after about 100 misses). The
request carries the deadline's budget, so atoll's server skips its model work once it is late.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from atoll.hybrid.client import CloudClient, CloudError
from atoll.hybrid.config import FusionConfig
from atoll.hybrid.edge import EdgeModel, EdgeStep
from atoll.hybrid.fusion import fuse
from atoll.hybrid.privacy import CloudView
from atoll.hybrid.vocab import EdgeVocabulary


@dataclass
class TokenRecord:
    """One position: the token emitted and how it came about."""

    token_id: int
    latency_s: float
    fusion_s: float = 0.0
    cloud_asked: bool = False
    fused: bool = False
    missed: bool = False
    error: bool = False
    edge_weight: float = float("nan")
    correct: bool | None = None


@dataclass
class Decoded:
    text: str
    records: list[TokenRecord] = field(default_factory=list)
    cloud_counts: dict[str, int] = field(default_factory=lambda: {"shared": 0, "prefix": 0, "eos": 0, "dropped": 0})


class HybridDecoder:
    """Runs one fusion method over the edge model and (optionally) a cloud client."""

    def __init__(self, edge: EdgeModel, vocab: EdgeVocabulary, client: CloudClient | None, fusion: FusionConfig, deadline_ms: float):
        self.edge = edge
        self.vocab = vocab
        self.client = client
        self.fusion = fusion
        self.deadline_s = deadline_ms / 1000.0

    async def decode(
        self,
        prompt: str,
        method: str,
        max_new_tokens: int,
        view: CloudView | None = None,
        reference: list[int] | None = None,
        stop: list[str] | tuple[str, ...] = (),
        on_text: Callable[[str], None] | None = None,
    ) -> Decoded:
        """Generate (or, with ``reference``, score teacher-forced along it) up to ``max_new_tokens``.
        ``view`` says what the cloud may see; None or an edge-only view keeps everything local."""
        use_cloud = method != "edge" and self.client is not None and view is not None and not view.kept_on_device
        with_base = method == "proxy"
        prompt_ids = self.edge.encode(prompt)
        result = Decoded(text="")
        generated = b""
        previous: int | None = None
        limit = max_new_tokens if reference is None else min(max_new_tokens, len(reference))
        for position in range(limit):
            started = time.perf_counter()
            task = None
            if use_cloud:
                cloud_text = view.text(generated.decode("utf-8", errors="replace"))
                task = asyncio.create_task(self.client.next_token(cloud_text, budget_ms=1000.0 * self.deadline_s))
                task.add_done_callback(_retrieve)
            if previous is None:
                step = await asyncio.to_thread(self.edge.start, prompt_ids, with_base)
            else:
                step = await asyncio.to_thread(self.edge.advance, previous)
            record = await self._choose(step, task, method, started, result)
            if reference is not None:
                record.correct = record.token_id == reference[position]
            result.records.append(record)
            emitted = record.token_id if reference is None else reference[position]
            if reference is None and emitted == self.vocab.eos_id:
                break
            piece = self.vocab.bytes_of[emitted] or b""
            generated += piece
            if on_text is not None and piece:
                on_text(piece.decode("utf-8", errors="replace"))
            text = generated.decode("utf-8", errors="replace")
            if reference is None and any(s and s in text for s in stop):
                break
            previous = emitted
        text = generated.decode("utf-8", errors="replace")
        for s in stop if reference is None else ():
            if s and s in text:
                text = text[: text.index(s)]
        result.text = text
        return result

    async def _choose(self, step: EdgeStep, task: asyncio.Task | None, method: str, started: float, result: Decoded) -> TokenRecord:
        edge_choice = int(torch.argmax(step.tuned))
        if task is None:
            return TokenRecord(edge_choice, time.perf_counter() - started)
        remaining = self.deadline_s - (time.perf_counter() - started)
        done, _ = await asyncio.wait({task}, timeout=max(remaining, 0.0))
        if task not in done:  # abandoned, not cancelled (see the module docstring); its answer is never read
            return TokenRecord(edge_choice, time.perf_counter() - started, cloud_asked=True, missed=True)
        if task.exception() is not None:
            if not isinstance(task.exception(), CloudError):
                raise task.exception()
            return TokenRecord(edge_choice, time.perf_counter() - started, cloud_asked=True, error=True)
        fusion_started = time.perf_counter()
        aligned = self.vocab.align(task.result())
        fused = fuse(
            method,
            aligned,
            step.tuned,
            step.base,
            edge_weight=self.fusion.edge_weight,
            alpha=self.fusion.alpha,
            support=self.fusion.support,
            top_k=self.client.top_k,
        )
        token = fused.argmax() if fused is not None else edge_choice
        finished = time.perf_counter()
        for how, count in aligned.counts.items():
            result.cloud_counts[how] += count
        return TokenRecord(
            token,
            finished - started,
            fusion_s=finished - fusion_started,
            cloud_asked=True,
            fused=fused is not None,
            edge_weight=fused.edge_weight if fused is not None else float("nan"),
        )


def _retrieve(task: asyncio.Task) -> None:
    """Mark a finished task's exception as seen (a cancelled or failed cloud call is expected)."""
    if not task.cancelled():
        task.exception()
