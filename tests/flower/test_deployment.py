"""A real loopback deployment: one SuperLink and three SuperNodes, each a separate process started
with the `atoll flower` helpers on free ports, over TLS with SuperNode authentication (test
certificates from `atoll flower certs`, node keys registered with `atoll flower register`),
awaited, and stopped (with every process they spawned, by PID) by the fixture.

1. Two rounds of FedSA-LoRA (each client keeps its own B between rounds, on its node) on Flower
   give the local engine's metrics (tolerance 1e-6 on every float, exact on clients, examples,
   steps and bytes): the nodes build the same data and model from the config, train the same
   clients with the same seeds, and carry each client's private B from round 1 to round 2 and to
   the final local evaluation.
2. A SuperNode terminated mid-run: the run finishes with the other two (min_available_clients: 2)
   and metrics.jsonl says which client was lost in which round.
3. A SuperNode whose key was never registered is turned away.

Slow by nature (Flower polls, and every message starts a fresh ClientApp process): tens of seconds
on an idle 2-core machine, minutes on a loaded one. No wall-clock time is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from atoll.config import config_with
from atoll.engines.flower.processes import ManagedProcess, flower_env, free_port, wait_healthy
from atoll.report.progress import Progress
from atoll.dispatch import start_run
from conftest import tiny_overrides
from helpers import assert_same_length, read_summary

# one federation for the module; with the simulation tests, one Flower runtime at a time on the machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600), pytest.mark.xdist_group("flower-runtime")]

CLIENTS = 3
FLOAT_TOLERANCE = 1e-6


def atoll_command(*args) -> list[str]:
    return [sys.executable, "-m", "atoll", "flower", *map(str, args)]


class Federation:
    """A TLS SuperLink with node authentication and one registered SuperNode per partition, on
    loopback, each process with a private FLWR_HOME."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.certs = root / "certs"
        self.superlink: ManagedProcess | None = None
        self.nodes: dict[int, ManagedProcess] = {}
        self.started: list[int] = []

    def start(self) -> None:
        root = self.root
        subprocess.run(atoll_command("certs", self.certs, "--nodes", CLIENTS), check=True, capture_output=True)
        self.superlink = ManagedProcess(
            atoll_command("superlink", "--certs", self.certs, "--node-auth", "--host", "127.0.0.1", "--port", self.port),
            flower_env(root / "home-superlink"),
            root / "superlink.log",
        )
        wait_healthy("127.0.0.1", self.port, timeout=300, ca=self.certs / "ca.crt", process=self.superlink)
        keys = [self.certs / f"node-{i}.pub" for i in range(CLIENTS)]
        registered = subprocess.run(
            atoll_command("register", *keys, "--superlink", self.address, "--certs", self.certs),
            capture_output=True,
            text=True,
            env=flower_env(root / "home-cli"),
        )
        assert registered.returncode == 0, registered.stdout + registered.stderr
        for partition in range(CLIENTS):
            self.nodes[partition] = self.supernode(partition, "--node-auth")

    def supernode(self, partition: int, *auth) -> ManagedProcess:
        self.started.append(partition)
        return ManagedProcess(
            atoll_command(
                "supernode",
                "--superlink",
                self.address,
                "--certs",
                self.certs,
                *auth,
                "--partition-id",
                partition,
                "--num-partitions",
                CLIENTS,
                "--port",
                free_port(),
            ),
            flower_env(self.root / f"home-node-{len(self.started)}"),
            self.root / f"supernode-{len(self.started)}.log",
        )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        if self.superlink is not None:
            self.superlink.stop()


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(tmp_path_factory.mktemp("federation"))
    try:
        fed.start()
        yield fed
    finally:
        fed.close()
    for process in [fed.superlink, *fed.nodes.values()]:
        assert not process.alive()
        assert not [p.pid for p in process.descendants() if running(p)], "a Flower process outlived the test"


def running(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def deployment_overrides(root: Path, federation: Federation, **extra) -> list[str]:
    values = {
        "engine": "flower",
        "federation.clients": CLIENTS,
        "eval.local": "final",
        "flower.mode": "deployment",
        "flower.superlink": federation.address,
        "flower.root_certificates": str(federation.certs / "ca.crt"),
        "flower.wait_timeout": 600,
        "flower.round_timeout": 900,
    }
    values.update(extra)
    return tiny_overrides(root, **values)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_close(flower, local, where=""):
    """Same structure; floats within FLOAT_TOLERANCE; everything else equal."""
    if isinstance(local, dict):
        assert set(flower) == set(local), where
        for key in local:
            assert_close(flower[key], local[key], f"{where}.{key}")
    elif isinstance(local, float):
        assert flower == pytest.approx(local, abs=FLOAT_TOLERANCE), where
    else:
        assert flower == local, where


def test_two_rounds_of_a_personalized_algorithm_on_a_deployment_match_the_local_engine(tmp_path, federation, reference_runs):
    extra = {"algorithm.name": "fedsa-lora", "federation.clients": CLIENTS, "eval.local": "never"}
    local_dir = reference_runs.get(**extra)
    flower_config = config_with(deployment_overrides(tmp_path / "flower", federation, **{**extra, "run.plots": "false"}))
    flower_dir, summary = start_run(flower_config, Progress())

    local_records, flower_records = records(local_dir), records(flower_dir.path)
    assert [r["round"] for r in flower_records] == [0, 1, 2]
    assert_same_length(flower_records, local_records, "metrics records")
    for flower, local in zip(flower_records, local_records, strict=True):
        details = flower.pop("flower", None)
        if flower["round"] > 0:
            assert details == {"online": [0, 1, 2], "offline": [], "dropped": [], "failures": {}}
        for record in (flower, local):
            record.pop("seconds", None)
            record.pop("wall_seconds", None)
        assert_close(flower, local, f"round {local['round']}")
    local_summary = read_summary(local_dir)
    assert_close(summary["final_global"], local_summary["final_global"], "final_global")
    assert_close(summary["final_local"], local_summary["final_local"], "final_local")
    assert summary["engine"] == {"name": "flower", "mode": "deployment", "secagg": False, "dp": "none", "dropped_updates": 0}
    assert (flower_dir.path / "summary.json").is_file() and (flower_dir.path / "config.yaml").is_file()
    assert not (flower_dir.path / "adapter").exists(), "FedSA-LoRA has no global adapter"


def test_a_supernode_killed_mid_run_leaves_the_others_to_finish(tmp_path, federation):
    rounds = 2
    config = config_with(
        deployment_overrides(
            tmp_path,
            federation,
            **{"federation.rounds": rounds, "eval.local": "never", "flower.min_available_clients": 2, "run.dir": str(tmp_path / "run")},
        )
    )
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = start_run(config, Progress())
        except BaseException as error:  # surfaced by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    metrics = tmp_path / "run" / "metrics.jsonl"
    while thread.is_alive() and not (metrics.is_file() and '"round": 1,' in metrics.read_text()):
        time.sleep(0.5)
    victim = federation.nodes[2]
    victim.stop()  # SIGTERM the SuperNode (its ClientApps follow) while round 2 starts
    assert not victim.alive()
    thread.join(timeout=3000)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    _, summary = outcome["result"]

    history = records(tmp_path / "run")
    assert [r["round"] for r in history] == list(range(rounds + 1))
    assert history[1]["clients"] == [0, 1, 2] and history[1]["flower"]["dropped"] == []
    after = history[2]  # the node went down as round 2 started: offline before it was asked, or dropped while training
    lost = set(after["flower"]["offline"]) | set(after["flower"]["dropped"])
    assert lost == {2}, after["flower"]
    assert after["train"]["steps"] == 2 * config.train.local_steps  # two clients trained
    if 2 in after["flower"]["dropped"]:
        assert after["flower"]["failures"]["2"]
    assert "accuracy" in summary["final_global"]
    assert summary["rounds"] == rounds


def test_a_supernode_with_an_unregistered_key_is_turned_away(tmp_path, federation):
    from atoll.engines.flower.certs import generate

    rogue_keys = generate(tmp_path / "rogue", [], nodes=1)
    rogue = federation.supernode(0, "--auth-key", rogue_keys.node_key(0))
    try:
        code = rogue.process.wait(timeout=600)
    finally:
        rogue.stop()
    assert code != 0
    assert "Failed to activate SuperNode" in rogue.log_path.read_text()
