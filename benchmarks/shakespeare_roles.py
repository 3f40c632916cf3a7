"""The Shakespeare-roles benchmark: each algorithm from the pretrained atoll-edge and from random
init, through `atoll run configs/shakespeare.yaml` only, and the table of docs/shakespeare.md.

Every cell is one `atoll run` with `--set algorithm.name=...` and `--set model.random_init=...`;
a cell whose run directory already holds a summary.json is not run again, so a killed benchmark
continues where it stopped. The table goes between the markers in docs/shakespeare.md.

    python benchmarks/shakespeare_roles.py [--workers 2] [--algorithms centralized,local-only,fedit,...]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ["fedit", "local-only", "centralized", "flexlora", "fedadagrad", "fedsa-lora"]
INITS = {"pretrained": "false", "random init": "true"}
BEGIN, END = "<!-- shakespeare-bench:begin -->", "<!-- shakespeare-bench:end -->"


def run_cell(config: Path, runs: Path, algorithm: str, init: str, extra: list[str]) -> dict:
    directory = runs / f"{algorithm}-{init.replace(' ', '-')}"
    if (directory / "summary.json").is_file():
        return json.loads((directory / "summary.json").read_text())
    shutil.rmtree(directory, ignore_errors=True)
    command = [sys.executable, "-m", "atoll", "run", str(config), "--quiet"]
    sets = [f"algorithm.name={algorithm}", f"model.random_init={INITS[init]}", f"run.dir={directory}", "run.plots=false", *extra]
    for item in sets:
        command += ["--set", item]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{algorithm} ({init}) failed:\n{finished.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    (directory / "bench-seconds.txt").write_text(f"{seconds:.1f}\n")
    print(f"{algorithm:12} {init:12} {seconds:6.0f} s", flush=True)
    return json.loads((directory / "summary.json").read_text())


def _cell(metrics: dict, key: str, digits: int) -> str:
    return f"{metrics[key]:.{digits}f}" if key in metrics else "-"


def render(results: dict[tuple[str, str], dict], command: str, minutes: float) -> str:
    any_summary = next(iter(results.values()))
    rounds = any_summary["rounds"]
    lines = [
        BEGIN,
        f"Made by `{command}`: {minutes:.1f} minutes of `atoll run` in all (summed over cells, setup included) on the shared "
        "2-core machine, with other jobs running; one torch thread per run.",
        "",
        f"{any_summary['clients']} clients (roles), {rounds} rounds, base config `configs/shakespeare.yaml`, seed 0. Global = the "
        "server's model on the global held-out lines (for algorithms without a global model: the mean of the clients' own "
        "models on them). Personalized = the mean over clients of the model each client uses, on its own held-out lines. "
        "Perplexity is per atoll-edge token (vocabulary 4,096); the personalized column is the mean of the clients' "
        "perplexities. Accuracy = next-token accuracy on the line's tokens. MB per round = bytes sent, summed over clients.",
        "",
        "| start | algorithm | global perplexity | global next-token acc. | personalized perplexity | personalized next-token acc. "
        "| MB up / round | MB down / round | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for init in INITS:
        first = next((s for (a, i), s in results.items() if i == init), None)
        if first is not None and "initial_global" in first:
            start = first["initial_global"]
            lines.append(
                f"| {init} | *before fine-tuning* | {_cell(start, 'perplexity', 1)} | {_cell(start, 'token_accuracy', 3)} | | | | | |"
            )
        for (algorithm, cell_init), summary in results.items():
            if cell_init != init:
                continue
            final, local = summary.get("final_global", {}), summary.get("final_local", {})
            up = summary["bytes_up_total"] / rounds / 1e6
            down = summary["bytes_down_total"] / rounds / 1e6
            lines.append(
                f"| {init} | {algorithm} | {_cell(final, 'perplexity', 1)} | {_cell(final, 'token_accuracy', 3)} | "
                f"{_cell(local, 'perplexity', 1)} | {_cell(local, 'token_accuracy', 3)} | {up:.2f} | {down:.2f} | "
                f"{summary['wall_seconds_rounds'] / 60:.1f} |"
            )
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "shakespeare.yaml")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "shakespeare-bench")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument(
        "--inits", default=",".join(INITS), help="which starts to run: pretrained, random init (the table shows every finished cell)"
    )
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "shakespeare.md")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="override a key in every run")
    args = parser.parse_args()
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    chosen = [i.strip() for i in args.inits.split(",") if i.strip()]
    cells = [(algorithm, init) for init in INITS for algorithm in algorithms]
    args.runs.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(lambda cell: run_cell(args.config, args.runs, cell[0], cell[1], args.extra), [c for c in cells if c[1] in chosen]))
    results = {}
    for algorithm, init in cells:  # every finished cell, also those another sitting ran
        path = args.runs / f"{algorithm}-{init.replace(' ', '-')}" / "summary.json"
        if path.is_file():
            results[(algorithm, init)] = json.loads(path.read_text())
    seconds = [args.runs / f"{a}-{i.replace(' ', '-')}" / "bench-seconds.txt" for a, i in cells]
    minutes = sum(float(p.read_text()) for p in seconds if p.is_file()) / 60
    command = "python benchmarks/shakespeare_roles.py " + shlex.join(sys.argv[1:])
    table = render(results, command.strip(), minutes)
    text = args.doc.read_text()
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + table + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    args.doc.write_text(text)
    print(table)


if __name__ == "__main__":
    main()
