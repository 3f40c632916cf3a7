"""``atoll hybrid eval CONFIG``: every fusion method on one task, side by side.

Per method: the task metric, per-token latency p50/p95/p99, the share of tokens fused, deadline
misses and cloud errors, bytes sent to and received from the cloud, prompts kept on the device
(edge_only) or redacted. The run directory holds config.yaml, metrics.jsonl (one line per method
and example), summary.json and table.md.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from atoll.errors import ConfigError, DataError
from atoll.hybrid.config import CLIENT_TEST, EdgeConfig, HybridConfig, TaskConfig
from atoll.hybrid.privacy import CloudView
from atoll.hybrid.session import Session, open_session


@dataclass
class Example:
    prompt: str
    reference: str


def load_examples(task: TaskConfig, seed: int, edge: EdgeConfig | None = None) -> list[Example]:
    """The task's examples: the first ``max_examples`` of a seeded shuffle."""
    from atoll.data.sources import load_source

    if "{prompt}" not in task.template:
        raise ConfigError(f"task.template must contain {{prompt}}, got {task.template!r}")
    if task.source == CLIENT_TEST:
        held_out = client_test_examples(edge.run, edge.client)
        order = np.random.default_rng(task_seed(seed)).permutation(len(held_out))[: task.max_examples]
        return [Example(task.template.format(prompt=held_out[i].prompt), held_out[i].reference) for i in order.tolist()]
    raw = load_source(task.source)
    columns = {}
    for option, default_key in (("prompt_column", "prompt_column"), ("reference_column", "response_column")):
        name = getattr(task, option) or raw.defaults.get(default_key)
        if name is None or name not in raw.columns:
            raise DataError(
                f"task.{option} {'is not set' if name is None else repr(name) + ' is not a column'}",
                f"set it to one of: {', '.join(raw.columns)}",
            )
        columns[option] = raw.columns[name]
    order = np.random.default_rng(task_seed(seed)).permutation(len(raw))[: task.max_examples]
    return [
        Example(task.template.format(prompt=str(columns["prompt_column"][i])), str(columns["reference_column"][i])) for i in order.tolist()
    ]


def client_test_examples(run_dir: str, client: int) -> list[Example]:
    """Client ``client``'s held-out examples in federated run ``run_dir``: the split the run made
    (same data, partition and seed), with the run's task formatting of prompt and response."""
    from atoll.experiment import load_data
    from atoll.hybrid.loading import run_config

    config = run_config(run_dir)
    raw, spec, _, _, splits = load_data(config)
    if not spec.is_generative:
        raise DataError(f"run '{run_dir}' trained a {spec.kind} task", "task.source client-test needs a text-generation run")
    if client >= len(splits.client_test) or len(splits.client_test[client]) == 0:
        raise DataError(f"client {client} of run '{run_dir}' has no held-out examples", "choose another edge.client")
    prompts, responses = raw.columns[spec.prompt_column], raw.columns[spec.response_column]
    return [
        Example(spec.prompt_text(str(prompts[i] or "")), spec.response_text(str(responses[i] or ""))) for i in splits.client_test[client]
    ]


def task_seed(seed: int) -> int:
    return 7919 * seed + 17


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def score(metric: str, generated: str, reference: str) -> float:
    if metric == "exact_match":
        return float(_normalise(generated) == _normalise(reference))
    if metric == "contains":
        return float(_normalise(reference) in _normalise(generated))
    raise ValueError(metric)


def percentiles(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan")}
    ms = np.asarray(values_s) * 1000.0
    return {
        "p50": float(np.percentile(ms, 50)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
    }


async def evaluate_method(session: Session, method: str, examples: list[Example], record: Callable[[dict], None]) -> dict[str, Any]:
    """Run ``method`` over every example; one record per example; the method's summary."""
    config = session.config
    task = config.task
    client = session.client
    sent0, received0 = (client.bytes_sent, client.bytes_received) if client else (0, 0)
    latencies, fusion_times, values = [], [], []
    tokens = fused = missed = errors = kept = redacted = correct = scored = 0
    counts = {"shared": 0, "prefix": 0, "eos": 0, "dropped": 0}
    for index, example in enumerate(examples):
        view = CloudView(session.detector, config.privacy.policy, example.prompt) if method != "edge" else None
        reference_ids = None
        if task.metric == "next_token_accuracy":
            reference_ids = session.edge.tokenizer(example.reference, add_special_tokens=False)["input_ids"]
            if session.vocab.eos_id is not None:
                reference_ids = reference_ids + [session.vocab.eos_id]
        decoded = await session.decoder.decode(
            example.prompt, method, task.max_new_tokens, view=view, reference=reference_ids, stop=task.stop
        )
        records = decoded.records
        if task.metric == "next_token_accuracy":
            hits = sum(bool(r.correct) for r in records)
            correct, scored = correct + hits, scored + len(records)
            value = hits / max(len(records), 1)
        else:
            value = score(task.metric, decoded.text, example.reference)
            values.append(value)
        latencies += [r.latency_s for r in records]
        fusion_times += [r.fusion_s for r in records if r.fused]
        tokens += len(records)
        fused += sum(r.fused for r in records)
        missed += sum(r.missed for r in records)
        errors += sum(r.error for r in records)
        kept += bool(view and view.kept_on_device)
        redacted += bool(view and view.redacted)
        for how, count in decoded.cloud_counts.items():
            counts[how] += count
        record(
            {
                "method": method,
                "example": index,
                "metric": task.metric,
                "value": value,
                "tokens": len(records),
                "fused": sum(r.fused for r in records),
                "deadline_misses": sum(r.missed for r in records),
                "cloud_errors": sum(r.error for r in records),
                "kept_on_device": bool(view and view.kept_on_device),
                "redacted": bool(view and view.redacted),
                "latency_ms": percentiles([r.latency_s for r in records]),
                "text": decoded.text,
            }
        )
    metric_value = correct / max(scored, 1) if task.metric == "next_token_accuracy" else float(np.mean(values)) if values else 0.0
    return {
        "method": method,
        task.metric: metric_value,
        "examples": len(examples),
        "tokens": tokens,
        "latency_ms": percentiles(latencies),
        "fusion_ms": {"mean": float(np.mean(fusion_times) * 1000) if fusion_times else 0.0, **_p99(fusion_times)},
        "fused_share": fused / max(tokens, 1),
        "deadline_misses": missed,
        "cloud_errors": errors,
        "bytes_sent": (client.bytes_sent - sent0) if client else 0,
        "bytes_received": (client.bytes_received - received0) if client else 0,
        "prompts_kept_on_device": kept,
        "prompts_redacted": redacted,
        "cloud_tokens_aligned": counts,
    }


def _p99(values_s: list[float]) -> dict[str, float]:
    return {"p99": float(np.percentile(np.asarray(values_s) * 1000, 99)) if values_s else 0.0}


def table(config: HybridConfig, results: list[dict[str, Any]]) -> str:
    metric = config.task.metric
    lines = [
        f"| method | {metric} | p50 ms | p95 ms | p99 ms | fused | misses | errors | kB sent | kept on device | fusion ms (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['method']} | {r[metric]:.4f} | {lat['p50']:.1f} | {lat['p95']:.1f} | {lat['p99']:.1f} | {100 * r['fused_share']:.1f} % | "
            f"{r['deadline_misses']} | {r['cloud_errors']} | {r['bytes_sent'] / 1000:.1f} | {r['prompts_kept_on_device']}/{r['examples']} | "
            f"{r['fusion_ms']['mean']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def run_eval(config: HybridConfig, echo: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Evaluate every configured method; returns (run directory, summary)."""
    from atoll.report.rundir import RunDir, write_atomic

    from atoll.hybrid.loading import edge_source

    edge_model, adapter = edge_source(config.edge)  # a bad edge.run fails here, before anything is written
    examples = load_examples(config.task, config.seed, config.edge)
    path = RunDir.choose_path(config)
    RunDir.check_new(path)

    async def main() -> tuple[Path, dict[str, Any]]:
        async with open_session(config) as session:
            await session.decoder.decode("Hello", "edge", 2)  # warm-up: the first forward pass is slow
            run = RunDir.create(path, config)
            results = []
            for method in config.fusion.methods:
                echo(f"{method}: {len(examples)} examples")
                results.append(await evaluate_method(session, method, examples, run.append_metrics))
            summary = {
                "name": config.name,
                "metric": config.task.metric,
                "edge": edge_model,
                "adapter": adapter,
                "edge_run": config.edge.run,
                "edge_client": config.edge.client,
                "cloud": session.cloud_url and config.cloud.model,
                "cloud_url": session.cloud_url,
                "cloud_server": await session.server_health(),  # a launched cloud: its workers and prefix-cache counts
                "deadline_ms": config.cloud.deadline_ms,
                "privacy_policy": config.privacy.policy,
                "methods": results,
                "run_dir": str(path),
            }
            run.write_summary(summary)
            write_atomic(path / "table.md", table(config, results))
            return path, summary

    return asyncio.run(main())


def summary_text(summary: dict[str, Any], config: HybridConfig) -> str:
    return table(config, summary["methods"]) + f"run directory: {summary['run_dir']}"
