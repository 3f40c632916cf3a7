"""``atoll run --engine flower``: write the run's Flower app, submit it, follow it, report it.

Simulation: a private SuperLink in simulation mode on a free loopback port (started and stopped
here), ``flwr run`` with ``num-supernodes = federation.clients``. Deployment: submit to the SuperLink
named in ``flower.superlink`` (its SuperNodes were started elsewhere, one per partition). In both,
the ServerApp writes the run directory; when it is on this machine its metrics.jsonl is followed
for progress and its summary.json is returned.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from atoll.engines.flower.appdir import write_app
from atoll.engines.flower.processes import (
    FlowerError,
    ManagedProcess,
    executable,
    flower_env,
    free_port,
    run_flwr,
    superlink_command,
    wait_healthy,
    write_connection,
)
from atoll.errors import AtollError

CONNECTION = "atoll"
SUPERLINK_START_SECONDS = 120.0
STATUS_INTERVAL = 5.0


class RemoteRunError(AtollError):
    kind = "flower run failed"


def simulation_federation_config(config) -> str:
    """``--federation-config`` for the simulation engine: one virtual node per client, ``actors``
    ClientApps in parallel with one CPU each."""
    clients = config.federation.clients
    actors = config.flower.actors or max(1, min(clients, os.cpu_count() or 1))
    return f"num-supernodes={clients} client-resources-num-cpus=1 init-args-num-cpus={actors}"


def _read_new_records(path: Path, seen: int) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of metrics.jsonl after the first ``seen`` ones."""
    try:
        lines = path.read_text().splitlines(keepends=True)
    except OSError:
        return [], seen
    records = []
    for line in lines[seen:]:
        if not line.endswith("\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        seen += 1
    return records, seen


def flwr_error_line(output: str) -> str:
    """The message of a ``flwr`` CLI failure on one line (its error box flattened)."""
    lines = output.strip().splitlines()
    boxed = [line.strip(" │╭╮╰╯─") for line in lines if line.startswith("│")]
    if boxed:
        return " ".join(part for part in boxed if part)
    return lines[-1].strip() if lines else "no output"


def _run_status(run_id: str, env: dict[str, str]) -> dict[str, Any]:
    result = run_flwr(["list", CONNECTION, "--run-id", run_id, "--format", "json"], env)
    try:
        return json.loads(result.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError):
        return {"status": "unknown", "status-details": (result.stdout + result.stderr).strip()[-500:]}


def _failure_message(details: str, run_dir: Path, log_text: str) -> str:
    error_file = run_dir / "flower-error.txt"
    if error_file.is_file():
        return error_file.read_text().strip().splitlines()[-1] if error_file.read_text().strip() else details
    for prefix in ("ServerApp failed with exception: ", "Simulation failed with exception: "):
        if details.startswith(prefix):
            details = details[len(prefix) :]
    if details and details != "N/A":
        return details
    lines = [line.strip() for line in log_text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "Exception" in line or "error" in line]
    return (errors or lines or ["no log"])[-1]


def start_flower_run(run, progress) -> tuple[Any, dict[str, Any]]:
    """Submit a resolved run to Flower and wait for it; returns (RunDir, summary)."""
    from atoll.report.rundir import RunDir

    config = run.config
    flower = config.flower
    path = RunDir.choose_path(config).expanduser().absolute()
    RunDir.check_new(path)
    if flower.mode == "simulation":  # everything runs here: catch a wrong model or data path before starting Ray
        from atoll.data.sources import load_source
        from atoll.models.registry import check_model_name

        check_model_name(config.model.name)
        load_source(config.data.source)
    with tempfile.TemporaryDirectory(prefix="atoll-flower-") as scratch:
        scratch_dir = Path(scratch)
        home = scratch_dir / "flwr-home"
        env = flower_env(home)
        app = write_app(scratch_dir / "app", run, path)
        superlink: ManagedProcess | None = None
        try:
            if flower.mode == "simulation":
                port = free_port()
                superlink = ManagedProcess(
                    superlink_command("127.0.0.1", port, simulation=True), env, scratch_dir / "superlink.log", cwd=scratch_dir
                )
                wait_healthy("127.0.0.1", port, SUPERLINK_START_SECONDS, process=superlink)
                write_connection(home, CONNECTION, f"127.0.0.1:{port}", insecure=True, root_certificates=None)
                extra = ["--federation-config", simulation_federation_config(config)]
            else:
                root = Path(flower.root_certificates).expanduser() if flower.root_certificates else None
                if root is not None and not root.is_file():
                    raise FlowerError(f"flower.root_certificates '{root}' does not exist")
                write_connection(home, CONNECTION, flower.superlink, insecure=flower.insecure, root_certificates=root)
                extra = []
            progress.message(f"submitting to Flower ({flower.mode}); run directory {path}")
            summary = _submit_and_follow(app, env, extra, path, progress, scratch_dir, superlink)
        finally:
            if superlink is not None:
                superlink.stop()
    return RunDir(path), summary


def _submit_and_follow(app: Path, env, extra: list[str], path: Path, progress, scratch: Path, superlink) -> dict[str, Any]:
    log_path = scratch / "flwr-run.log"
    with open(log_path, "wb") as log_file:
        runner = subprocess.Popen(
            [executable("flwr"), "run", str(app), CONNECTION, "--stream", *extra],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=scratch,
        )
    run_id = None
    seen = 0
    rounds = None
    last_status = 0.0
    status: dict[str, Any] = {}
    try:
        while True:
            text = log_path.read_text(errors="replace")
            if run_id is None:
                match = re.search(r"started run (\d+)", text)
                if match:
                    run_id = match.group(1)
            records, seen = _read_new_records(path / "metrics.jsonl", seen)
            for record in records:
                if rounds is None:
                    rounds = True
                    progress.start(_config_rounds(path), 1)
                if record.get("round", 0) > 0:
                    progress.round_end(record["round"], record)
            finished = runner.poll() is not None
            if superlink is not None and not superlink.alive():
                raise FlowerError(f"the simulation SuperLink stopped unexpectedly:\n{superlink.log_tail()}")
            if finished:
                break
            if run_id is not None and time.monotonic() - last_status > STATUS_INTERVAL * 6:
                last_status = time.monotonic()
                status = _run_status(run_id, env)
                if str(status.get("status", "")).startswith("finished"):
                    break
            time.sleep(1.0)
        if runner.poll() is None:
            runner.send_signal(signal.SIGINT)
            try:
                runner.wait(timeout=10)
            except subprocess.TimeoutExpired:
                runner.kill()
        text = log_path.read_text(errors="replace")
        if run_id is None:
            match = re.search(r"started run (\d+)", text)
            if not match:
                raise FlowerError(
                    f"`flwr run` did not start a run: {flwr_error_line(text)}", "check flower.superlink and that the SuperLink is running"
                )
            run_id = match.group(1)
        status = _run_status(run_id, env)
        records, seen = _read_new_records(path / "metrics.jsonl", seen)
        for record in records:
            if record.get("round", 0) > 0:
                progress.round_end(record["round"], record)
    except KeyboardInterrupt:
        if run_id is not None:
            run_flwr(["stop", run_id, CONNECTION], env, timeout=60)
        if runner.poll() is None:
            runner.kill()
        raise
    finally:
        if rounds:
            progress.close()
    if status.get("status") != "finished:completed":
        raise RemoteRunError(_failure_message(str(status.get("status-details", "")), path, text))
    summary_path = path / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    return _remote_summary(path, run_id)


def _config_rounds(path: Path) -> int:
    import yaml

    try:
        return int(yaml.safe_load((path / "config.yaml").read_text())["federation"]["rounds"])
    except (OSError, KeyError, TypeError, ValueError):
        return 0


def _remote_summary(path: Path, run_id: str) -> dict[str, Any]:
    """The run finished on a SuperLink on another machine: its run directory is there."""
    return {
        "algorithm": "?",
        "data": "?",
        "model": "?",
        "clients": 0,
        "rounds": 0,
        "metric": "",
        "final_global": {},
        "final_local": {},
        "bytes_up_total": 0,
        "bytes_down_total": 0,
        "wall_seconds_rounds": 0.0,
        "run_dir": f"{path} on the SuperLink's machine (Flower run {run_id})",
    }
