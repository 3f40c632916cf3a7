"""``atoll hybrid ...``: serve-cloud, chat, eval. Importing this module imports no torch."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Optional

import typer

from atoll.console import fail, quiet_libraries
from atoll.errors import AtollError

hybrid_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Hybrid edge–cloud inference: a personal edge model fused with a cloud LLM."
)


def _config(config: Optional[Path], set_: list[str], extra: list[str]):
    from atoll.hybrid.config import load_hybrid_config

    return load_hybrid_config(config, list(set_) + extra)


@hybrid_app.command("serve-cloud")
def serve_cloud(
    model: str = typer.Argument("atoll-cloud", help="a registry name or a local Hugging Face causal-LM directory"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port (0: any free port; the URL is printed)"),
    max_logprobs: int = typer.Option(20, help="the most top-k log-probabilities a request may ask for"),
    delay_ms: float = typer.Option(0.0, help="slow every response by this many ms on purpose"),
    jitter_ms: float = typer.Option(0.0, help="plus a uniform random 0..jitter ms"),
    log_requests: Optional[Path] = typer.Option(None, help="append every received prompt to this JSONL file"),
    threads: int = typer.Option(1, help="torch CPU threads"),
    seed: int = typer.Option(0, help="seed of the delay jitter and of sampling without a request seed"),
    workers: int = typer.Option(1, help="requests served at once: threads sharing the one loaded model"),
    cache_entries: int = typer.Option(0, help="keep the KV caches of this many recent prompts (LRU) for prompts that extend them; 0: off"),
) -> None:
    """Serve a causal LM behind an OpenAI-compatible /v1/completions that returns top-k log-probabilities."""
    quiet_libraries()
    if max_logprobs < 1 or delay_ms < 0 or jitter_ms < 0 or threads < 1 or not 0 <= port < 65536:
        fail(AtollError("--max-logprobs and --threads must be >= 1, delays >= 0, port 0..65535"))
    try:
        from atoll.hybrid.config import check_load_options

        check_load_options(workers, cache_entries)
    except AtollError as error:
        fail(error)
    try:
        import torch
        import uvicorn

        from atoll.hybrid.loading import load_causal_lm
        from atoll.hybrid.server import CloudModel, build_app

        torch.set_num_threads(threads)
        loaded, tokenizer = load_causal_lm(model)
    except AtollError as error:
        fail(error)
    app = build_app(
        CloudModel(loaded, tokenizer, model),
        max_logprobs,
        delay_ms,
        jitter_ms,
        seed,
        str(log_requests) if log_requests else None,
        workers,
        cache_entries,
    )
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off", ws="none"))

    async def run() -> None:
        serving = asyncio.create_task(server.serve())
        while not server.started:  # print the bound URL once listening (port 0 picks a free one)
            if serving.done():
                return await serving
            await asyncio.sleep(0.05)
        bound = server.servers[0].sockets[0].getsockname()[1]
        typer.echo(f"serving {model} at http://{host}:{bound}/v1")  # LaunchedCloud reads this line
        sys.stdout.flush()
        await serving

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


@hybrid_app.command("eval")
def eval_(
    config: Path = typer.Argument(..., help="a hybrid YAML config (see configs/hybrid/)"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set cloud.deadline_ms=50"),
) -> None:
    """Compare edge-only, cloud-only and the fusion methods on a task: metric, latency, traffic, privacy."""
    try:
        resolved = _config(config, set_, [])  # config errors come before any heavy import
        quiet_libraries()
        from atoll.hybrid.evaluate import run_eval, summary_text

        _, summary = run_eval(resolved, echo=lambda line: typer.echo(line, err=True))
    except AtollError as error:
        fail(error)
    typer.echo(summary_text(summary, resolved))


@hybrid_app.command("chat")
def chat(
    config: Optional[Path] = typer.Argument(None, help="a hybrid YAML config (optional)"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set edge.adapter=runs/x/adapter"),
    cloud: Optional[str] = typer.Option(None, help="cloud URL (same as --set cloud.url=...)"),
    method: Optional[str] = typer.Option(None, help="edge, cloud, weighted, proxy or router (default: the config's first)"),
    edge: Optional[str] = typer.Option(None, help="edge model (same as --set edge.model=...)"),
) -> None:
    """Interactive, streaming chat with the fused model."""
    extra = [f"cloud.url={cloud}"] * bool(cloud) + [f"fusion.methods=[{method}]"] * bool(method) + [f"edge.model={edge}"] * bool(edge)
    try:
        resolved = _config(config, set_, extra)
        quiet_libraries()
        from atoll.hybrid.chat import run_chat

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        run_chat(resolved, input, write)
    except AtollError as error:
        fail(error)
    except KeyboardInterrupt:
        typer.echo("")
