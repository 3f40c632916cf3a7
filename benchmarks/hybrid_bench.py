"""The hybrid edge-cloud benchmark of docs/hybrid.md, in one resumable command.

1. The edge's personal adapters: one `atoll run configs/shakespeare.yaml` with clustered-lora
   (roles grouped onto a few clients, ranks 4 and 8 alternating as two device tiers, clients
   clustered by adapter similarity, FlexLoRA inside each cluster), personal adapters exported.
2. Two tasks for one client's edge (atoll-edge + its cluster's adapter) against atoll-cloud:
   - `shakespeare`: the client's own held-out lines (task.source client-test): personal style;
   - `general`: held-out chunks of the pretraining corpus's KJV and WordNet text (never trained on
     by either model; the same genre both saw in pretraining, which the edge's Shakespeare adapter
     pulls away from): the first words of a verse or gloss are the prompt, the rest the reference.
   Each is one `atoll hybrid eval` of edge, cloud, weighted, proxy and router, with the cloud
   served on loopback; metric: next-token accuracy along the reference, in edge tokens. Every
   fused method is compared with edge and cloud on the same examples: the difference and its 95 %
   paired bootstrap interval over examples (teacher forcing scores every method on the same tokens).
3. The deadline: the first examples of the shakespeare task with the cloud slowed on purpose
   (delay + jitter), a deadline below the slow answers, so misses happen and p99 shows whether the
   deadline holds.

Every step whose summary.json exists is skipped, so a killed benchmark continues. The table goes
between the markers in docs/hybrid.md.

    nice -n 15 python benchmarks/hybrid_bench.py [--root runs/hybrid-bench] [--examples 200] [--deadline-examples 25]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- hybrid-bench:begin -->", "<!-- hybrid-bench:end -->"
METHODS = ["edge", "cloud", "weighted", "proxy", "router"]
FEDERATED = {
    "algorithm.name": "clustered-lora",
    "algorithm.aggregation": "flexlora",
    "algorithm.warmup_rounds": "2",
    "federation.clients": "6",
    "federation.rounds": "6",
    "federation.sample_rate": "1.0",
    "model.lora.rank_cycle": "[4, 8]",
    "train.local_steps": "5",
    "eval.every": "6",
    "eval.max_examples": "100",
    "run.export_personal": "true",
    "run.plots": "false",
}


def run(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        finished = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"failed ({log}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def federated_run(root: Path) -> Path:
    directory = root / "federated"
    if (directory / "summary.json").is_file():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    command = [sys.executable, "-m", "atoll", "run", str(ROOT / "configs" / "shakespeare.yaml"), "--quiet"]
    for key, value in {**FEDERATED, "run.dir": str(directory)}.items():
        command += ["--set", f"{key}={value}"]
    seconds = run(command, root / "federated.log")
    print(f"federated run: {seconds:.0f} s", flush=True)
    return directory


def general_task(root: Path) -> Path:
    """Held-out KJV verses and WordNet glosses (the pretraining split's held-out chunks): every
    line of at least 12 words (527 of them); the evaluation draws its examples from these."""
    path = root / "general.jsonl"
    if path.is_file():
        return path
    from atoll.lm.corpus import build_corpus

    corpus = build_corpus(["bible-kjv", "wordnet"], heldout_fraction=0.01, required=True)
    rows = []
    for chunk in corpus.heldout:
        for line in chunk.split("\n"):
            words = line.split()
            if len(words) >= 12:
                rows.append({"prompt": " ".join(words[:6]), "reference": " " + " ".join(words[6:])})
    import random

    random.Random(0).shuffle(rows)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def hybrid_eval(root: Path, name: str, tree: dict) -> dict:
    directory = root / name
    if (directory / "summary.json").is_file():
        return json.loads((directory / "summary.json").read_text())
    shutil.rmtree(directory, ignore_errors=True)
    tree = {**tree, "name": name, "run": {"dir": str(directory), "threads": 1}}
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    seconds = run([sys.executable, "-m", "atoll", "hybrid", "eval", str(config)], root / f"{name}.log")
    print(f"{name}: {seconds:.0f} s", flush=True)
    return json.loads((directory / "summary.json").read_text())


def cloud_description(model: str) -> str:
    """What the cloud model is, from its card (atoll's shipped models and `atoll pretrain` outputs have one)."""
    from atoll.models.registry import SHIPPED_MODELS, shipped_model_path

    path = shipped_model_path(model) if model in SHIPPED_MODELS else Path(model)
    card = path / "atoll_card.json"
    if not card.is_file():
        return f"`{model}`"
    numbers = json.loads(card.read_text())
    return f"{numbers['name']} ({numbers['parameters'] / 1e6:.1f}M parameters, {numbers['steps']:,} training steps, {numbers['tokens_seen'] / 1e6:.1f}M tokens seen)"


def per_example_hits(summary: dict) -> dict[str, tuple[list[int], list[int]]]:
    """Per method: correct tokens and scored tokens of every example, in example order."""
    hits: dict[str, tuple[list[int], list[int]]] = {}
    for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        correct, scored = hits.setdefault(row["method"], ([], []))
        correct.append(round(row["value"] * row["tokens"]))
        scored.append(row["tokens"])
    return hits


def paired_difference(method: tuple[list[int], list[int]], other: tuple[list[int], list[int]], resamples: int = 10000) -> str:
    """Accuracy of ``method`` minus ``other`` on the same examples and tokens, with a 95 % paired
    bootstrap interval over examples (tokens of one example are not independent; examples are)."""
    import numpy as np

    if method[1] != other[1]:
        raise SystemExit("paired comparison of runs that scored different tokens")
    a, b, n = (np.asarray(x, dtype=float) for x in (method[0], other[0], method[1]))
    draws = np.random.default_rng(0).integers(0, len(n), size=(resamples, len(n)))
    differences = (a[draws].sum(1) - b[draws].sum(1)) / n[draws].sum(1)
    low, high = np.percentile(differences, [2.5, 97.5])
    return f"{(a.sum() - b.sum()) / n.sum():+.3f} [{low:+.3f}, {high:+.3f}]"


def render(results: dict[str, dict], baselines: dict[str, str], federated: dict, client: int, command: str, when: str, cloud: str) -> str:
    lines = [
        BEGIN,
        f"Made by `{command}` on {when} on a 2-core machine, one torch thread per process. "
        f"Edge: atoll-edge + client {client}'s clustered-lora adapter from a {federated['clients']}-client, "
        f"{federated['rounds']}-round run (ranks 4/8); cloud: {cloud} served on loopback, top-5. "
        "Metric: next-token accuracy along the reference (teacher-forced, edge tokens, EOS included). Privacy policy `off` "
        "(every method sees the same prompts) except in the `privacy edge_only` row. "
        "`vs edge`, `vs cloud`: the fused method's accuracy minus theirs on the same examples and tokens, "
        "with a 95 % paired bootstrap interval over examples (10,000 resamples).",
        "",
        "| task | method | next-token acc. | vs edge | vs cloud | p50 ms | p99 ms | deadline ms | fused | misses | kB sent | kept on device | fusion ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, summary in results.items():
        hits = per_example_hits(summary)
        reference = per_example_hits(results[baselines[name]]) if name in baselines else {}
        for r in summary["methods"]:
            lat = r["latency_ms"]
            fused = r["method"] not in ("edge", "cloud")
            versus = [
                paired_difference(hits[r["method"]], reference[other]) if fused and other in reference else ""
                for other in ("edge", "cloud")
            ]
            lines.append(
                f"| {name} ({r['examples']} ex., {r['tokens']} tok.) | {r['method']} | {r['next_token_accuracy']:.3f} | {versus[0]} | {versus[1]} | "
                f"{lat['p50']:.1f} | {lat['p99']:.1f} | {summary['deadline_ms']:g} | {100 * r['fused_share']:.0f} % | {r['deadline_misses']} | "
                f"{r['bytes_sent'] / 1000:.0f} | {r['prompts_kept_on_device']}/{r['examples']} | {r['fusion_ms']['mean']:.3f} |"
            )
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/hybrid-bench", help="where runs go (resumes from what is there)")
    parser.add_argument("--examples", type=int, default=200, help="examples per task (accuracy rows)")
    parser.add_argument("--deadline-examples", type=int, default=25, help="examples of the slowed-cloud and privacy rows")
    parser.add_argument("--client", type=int, default=0, help="the client whose edge is evaluated")
    parser.add_argument("--cloud", default="atoll-cloud", help="the served cloud model: a registry name or a local HF directory")
    parser.add_argument("--no-doc", action="store_true", help="print the table instead of writing docs/hybrid.md")
    args = parser.parse_args()
    started_load = os.getloadavg()[0]
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)

    federated = federated_run(root)
    general = general_task(root)
    common = {
        "edge": {"run": str(federated), "client": args.client},
        "cloud": {"model": args.cloud, "serve": True, "top_k": 5, "deadline_ms": 250, "serve_cache_entries": 64},
        "fusion": {"methods": METHODS, "edge_weight": 0.5, "alpha": 1.0},
        "privacy": {"policy": "off"},
    }
    shakespeare_task = {"source": "client-test", "max_examples": args.examples, "max_new_tokens": 24}
    deadline_task = {**shakespeare_task, "max_examples": args.deadline_examples}  # the first of the same examples
    general_task_keys = {
        "source": str(general),
        "prompt_column": "prompt",
        "reference_column": "reference",
        "max_examples": args.examples,
        "max_new_tokens": 24,
    }
    union = {**common["fusion"], "support": "union"}  # the edge's own top-k may be chosen too (see Fusion)
    results = {
        "shakespeare": hybrid_eval(root, "shakespeare", {**common, "task": shakespeare_task}),
        "general": hybrid_eval(root, "general", {**common, "task": general_task_keys}),
        "shakespeare, support union": hybrid_eval(
            root,
            "shakespeare-union",
            {**common, "fusion": {**union, "methods": ["weighted", "proxy", "router"]}, "task": shakespeare_task},
        ),
        "general, support union": hybrid_eval(
            root,
            "general-union",
            {**common, "fusion": {**union, "methods": ["weighted", "proxy", "router"]}, "task": general_task_keys},
        ),
        "shakespeare, cloud +0..300 ms": hybrid_eval(
            root,
            "shakespeare-jitter-250",
            {
                **common,
                "cloud": {**common["cloud"], "serve_delay_ms": 0, "serve_jitter_ms": 300},
                "fusion": {**common["fusion"], "methods": ["weighted", "router"]},
                "task": deadline_task,
            },
        ),
        "shakespeare, cloud +100..400 ms": hybrid_eval(
            root,
            "shakespeare-slowed-250",
            {
                **common,
                "cloud": {**common["cloud"], "serve_delay_ms": 100, "serve_jitter_ms": 300},
                "fusion": {**common["fusion"], "methods": ["weighted", "router"]},
                "task": deadline_task,
            },
        ),
        "shakespeare, cloud +40..120 ms": hybrid_eval(
            root,
            "shakespeare-slowed",
            {
                **common,
                "cloud": {**common["cloud"], "serve_delay_ms": 40, "serve_jitter_ms": 80, "deadline_ms": 80},
                "fusion": {**common["fusion"], "methods": ["weighted", "router"]},
                "task": deadline_task,
            },
        ),
        "general, edge without adapter": hybrid_eval(
            root,
            "general-base-edge",
            {**common, "edge": {"model": "atoll-edge"}, "fusion": {"methods": ["edge"]}, "task": general_task_keys},
        ),
        "shakespeare, privacy edge_only": hybrid_eval(
            root,
            "shakespeare-edge-only-policy",
            {**common, "privacy": {"policy": "edge_only"}, "fusion": {**common["fusion"], "methods": ["router"]}, "task": deadline_task},
        ),
    }
    summary = json.loads((federated / "summary.json").read_text())
    command = "python benchmarks/hybrid_bench.py" + (f" --root {args.root}" if args.root != "runs/hybrid-bench" else "")
    command += f" --examples {args.examples}" if args.examples != 200 else ""
    command += f" --deadline-examples {args.deadline_examples}" if args.deadline_examples != 25 else ""
    command += f" --cloud {args.cloud}" if args.cloud != "atoll-cloud" else ""
    when = (
        time.strftime("%Y-%m-%d", time.gmtime())
        + f" (1-minute load average {started_load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)"
    )
    baselines = {
        "shakespeare": "shakespeare",
        "general": "general",
        "shakespeare, support union": "shakespeare",
        "general, support union": "general",
    }
    table = render(results, baselines, summary, args.client, command, when, cloud_description(args.cloud))
    if args.no_doc:
        print(table)
        return
    doc = ROOT / "docs" / "hybrid.md"
    text = doc.read_text()
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + table + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    doc.write_text(text)
    print(table)


if __name__ == "__main__":
    main()
