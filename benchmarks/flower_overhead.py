"""Flower's per-round overhead against the local engine on the same work, printed as a ratio.

The same config (same data, model, clients, seeds) runs once with ``engine: local`` and once on
Flower (simulation by default; ``--deployment`` starts a loopback SuperLink and one SuperNode per
client, each a separate process). Per-round wall time comes from each run's metrics.jsonl
(``wall_seconds``: sampling, training, aggregation and server evaluation of one round). Round 1
on Flower includes starting the Ray actors (simulation) or the first ClientApp processes, so the
steady state is the mean over rounds 2..R; round 1 and the fixed start-up cost (SuperLink, Ray,
submission, until the run directory appears) are printed separately. The two runs' task metrics
are checked to be equal (the overhead is measured on identical work).

With ``--deployment`` it also measures the floor of a deployment's per-message cost: a bare
ClientApp that only imports torch and transformers, loads the same model and echoes a download
of the same size (``benchmarks/flower_floor_app.py``), run on the same SuperNodes before and
after atoll's run. For both it prints what one train message costs, as the ClientApp process
reports it (from its start to its reply: Flower's start-up, imports, building, training) and as
the server sees the exchange (plus Flower's polling), and atoll's cost as a ratio to the floor.
Atoll's first round fills the nodes' data cache and is reported apart.

Wall time on a shared machine is noisy: the load average is printed before and after.

    python benchmarks/flower_overhead.py [--clients 4] [--rounds 4] [--steps 4] [--model tiny-bert] [--deployment] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


FLOOR_APP = Path(__file__).with_name("flower_floor_app.py")


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def per_round(run_dir: Path) -> list[float]:
    return [r["wall_seconds"] for r in records_of(run_dir) if r["round"] > 0]


def task_metrics(run_dir: Path) -> list[dict]:
    records = []
    for record in records_of(run_dir):
        for key in ("seconds", "wall_seconds", "flower"):
            record.pop(key, None)
        records.append(record)
    return records


def close(a, b, tolerance=1e-6) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(close(a[k], b[k], tolerance) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return abs(float(a) - float(b)) <= tolerance
    return a == b


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


# -- the floor: a bare ClientApp on the same SuperNodes ---------------------------------------------------------------


def floor_model(config, scratch: Path) -> dict:
    """How the floor loads the model atoll's run loads: random init from the same config, or the same weights."""
    from atoll.experiment import load_data
    from atoll.models.registry import SHIPPED_MODELS, load_base_model, minilm_path, shipped_model_path, tokenizer_from_data

    _, spec, tokenizer, _, _ = load_data(config)
    name = config.model.name
    recipe = {"generative": spec.is_generative, "num-labels": max(spec.num_labels, 2)}
    if name == "tiny-bert" or tokenizer_from_data(name) or config.model.random_init:
        model = load_base_model(
            name, spec.is_generative, spec.num_labels, tokenizer, config.model.dtype, config.seed, config.model.random_init
        )
        directory = scratch / "floor-model-config"
        model.config.save_pretrained(str(directory))
        return {**recipe, "model-kind": "config", "model-path": str(directory)}
    path = minilm_path() if name == "minilm" else shipped_model_path(name) if name in SHIPPED_MODELS else Path(name).expanduser()
    return {**recipe, "model-kind": "pretrained", "model-path": str(path)}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def run_floor(scratch: Path, label: str, address: str, settings: dict) -> list[dict]:
    """One run of the floor app on the deployment; its per-round timings."""
    from atoll.engines.flower.processes import executable, flower_env, write_connection

    app = scratch / f"floor-app-{label}"
    app.mkdir()
    shutil.copy(FLOOR_APP, app / "floor_app.py")
    output = scratch / f"floor-{label}.json"
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "[project]",
        'name = "atoll-floor"',
        'version = "1.0.0"',
        "dependencies = []",
        "[tool.flwr.app]",
        'publisher = "atoll"',
        "[tool.flwr.app.components]",
        'serverapp = "floor_app:server_app"',
        'clientapp = "floor_app:client_app"',
        "[tool.flwr.app.config]",
        *(f"{key} = {toml_value(value)}" for key, value in {**settings, "output": str(output)}.items()),
    ]
    (app / "pyproject.toml").write_text("\n".join(lines) + "\n")
    home = scratch / f"h-floor-{label}"
    write_connection(home, "bench", address, insecure=True, root_certificates=None)
    log = scratch / f"floor-{label}.log"
    with open(log, "wb") as handle:
        subprocess.run(
            [executable("flwr"), "run", str(app), "bench", "--stream"],
            env=flower_env(home),
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=3600,
        )
    if not output.is_file():
        raise SystemExit(f"the floor run wrote no timings; its log:\n{log.read_text()[-3000:]}")
    return json.loads(output.read_text())


def floor_costs(results: list[dict]) -> tuple[float, float]:
    """(mean ClientApp time from process start to reply, mean exchange time) over rounds 2..R."""
    steady = results[1:] or results
    return mean([c["since_start"] for r in steady for c in r["clients"]]), mean([r["exchange_seconds"] for r in steady])


def atoll_costs(records: list[dict]) -> tuple[float, float, float, float]:
    """Atoll's (process, exchange) costs over rounds 2..R and in round 1 (cold node cache)."""
    rounds = [r for r in records if r["round"] > 0]

    def costs(selected):
        process = [c["since_start"] for r in selected for c in r["flower"]["clientapp_seconds"].values()]
        return mean(process), mean([r["seconds"]["train"] for r in selected])

    steady, first = costs(rounds[1:] or rounds), costs(rounds[:1])
    return steady[0], steady[1], first[0], first[1]


def start_deployment(scratch: Path, clients: int) -> tuple[list, int]:
    from atoll.engines.flower.processes import ManagedProcess, flower_env, free_port, wait_healthy

    port = free_port()
    atoll = [sys.executable, "-m", "atoll", "flower"]
    processes = [
        ManagedProcess(atoll + ["superlink", "--insecure", "--port", str(port)], flower_env(scratch / "h-link"), scratch / "superlink.log")
    ]
    wait_healthy("127.0.0.1", port, 300, process=processes[0])
    for client in range(clients):
        command = atoll + ["supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--partition-id", str(client)]
        command += ["--num-partitions", str(clients), "--port", str(free_port())]
        processes.append(ManagedProcess(command, flower_env(scratch / f"h-node-{client}"), scratch / f"supernode-{client}.log"))
    return processes, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", default="tiny-bert")
    parser.add_argument("--deployment", action="store_true", help="a loopback SuperLink + SuperNodes instead of the simulation engine")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (run directories, process logs)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from atoll.config import config_with
    from atoll.dispatch import start_run
    from atoll.report.progress import Progress

    load_before = os.getloadavg()
    scratch = Path(tempfile.mkdtemp(prefix="atoll-flower-bench-"))
    os.environ.setdefault("ATOLL_CACHE", str(scratch / "cache"))
    base = [
        f"model.name={args.model}",
        "data.source=synthetic-cls",
        "data.max_examples=800",
        f"federation.clients={args.clients}",
        f"federation.rounds={args.rounds}",
        f"train.local_steps={args.steps}",
        "train.batch_size=16",
        "eval.every=1",
        "eval.local=never",
        "eval.batch_size=128",
        "run.threads=1",
    ]
    local_config = config_with(base + [f"run.dir={scratch / 'local'}"])
    local_dir, _ = start_run(local_config, Progress())

    processes: list = []
    flower = base + ["engine=flower", f"run.dir={scratch / 'flower'}"]
    floors: dict[str, list[dict]] = {}
    try:
        if args.deployment:
            processes, port = start_deployment(scratch, args.clients)
            address = f"127.0.0.1:{port}"
            flower += ["flower.mode=deployment", f"flower.superlink={address}", "flower.insecure=true"]
            first_record = next(r for r in records_of(local_dir.path) if r["round"] == 1)
            settings = {
                "rounds": args.rounds,
                "nodes": args.clients,
                "payload-floats": max(1, first_record["bytes_down"] // (4 * args.clients)),
                "threads": 1,
                **floor_model(local_config, scratch),
            }
            floors["before"] = run_floor(scratch, "before", address, settings)
        started = time.perf_counter()
        flower_dir, _ = start_run(config_with(flower), Progress())
        total = time.perf_counter() - started
        if args.deployment:
            floors["after"] = run_floor(scratch, "after", address, settings)
    finally:
        for process in reversed(processes):
            process.stop()

    local_rounds, flower_rounds = per_round(local_dir.path), per_round(flower_dir.path)
    same = all(close(a, b) for a, b in zip(task_metrics(local_dir.path), task_metrics(flower_dir.path)))
    steady_local = statistics.mean(local_rounds[1:]) if len(local_rounds) > 1 else local_rounds[0]
    steady_flower = statistics.mean(flower_rounds[1:]) if len(flower_rounds) > 1 else flower_rounds[0]
    fixed = total - sum(flower_rounds)
    engine = "deployment (loopback SuperLink + SuperNodes)" if args.deployment else "simulation (Ray)"
    print(f"Flower {engine} vs local engine: {args.clients} clients x {args.steps} steps, {args.rounds} rounds, {args.model}")
    print(f"  same task metrics in both runs: {'yes' if same else 'NO'}")
    print(f"  local engine per round (rounds 2..R): {steady_local:.3f} s; round 1: {local_rounds[0]:.3f} s")
    print(f"  Flower per round (rounds 2..R):       {steady_flower:.3f} s; round 1: {flower_rounds[0]:.3f} s")
    print(f"  Flower fixed cost (start-up, submission, teardown): {fixed:.1f} s of {total:.1f} s")
    print(f"  per-round overhead: {steady_flower - steady_local:+.3f} s; ratio Flower / local = {steady_flower / steady_local:.2f}")
    if args.deployment:
        process, exchange, first_process, first_exchange = atoll_costs(records_of(flower_dir.path))
        floor = {label: floor_costs(results) for label, results in floors.items()}
        floor_process = mean([f[0] for f in floor.values()])
        floor_exchange = mean([f[1] for f in floor.values()])
        print("  one train message, rounds 2..R (ClientApp: its process from start to reply; exchange: as the server waits for it)")
        for label, (p, e) in floor.items():
            print(f"    floor ({label} atoll's run): ClientApp {p:6.2f} s   exchange {e:6.2f} s")
        print(f"    atoll:                       ClientApp {process:6.2f} s   exchange {exchange:6.2f} s")
        print(f"    atoll round 1 (cold cache):  ClientApp {first_process:6.2f} s   exchange {first_exchange:6.2f} s")
        print(f"  ratio atoll / floor: ClientApp {process / floor_process:.2f}, exchange {exchange / floor_exchange:.2f} (target <= 1.5)")
    print(f"  load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (2 cores shared)")
    if args.keep:
        print(f"  run directories and logs kept in {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
