"""A real loopback deployment: one SuperLink and three SuperNodes, each a separate process started
with the `atoll flower` helpers on free ports, over TLS with SuperNode authentication (test
certificates from `atoll flower certs`, node keys registered with `atoll flower register`),
awaited, and stopped (with every process they spawned, by PID) by the fixture. Each SuperNode is
also given its own data file (``--data-file``), which only node-data runs read, and every process
of the deployment runs with an audit hook (a ``sitecustomize`` on its PYTHONPATH) that logs each
file it opens: one log for the SuperLink and everything it starts (the ServerApp), one per node.

1. Data that never moves (flower.node_data), with a personalized algorithm: two rounds of
   FedSA-LoRA, each client keeping its own B on its node between rounds, give the metrics of a
   local run with the natural partition of the same files (tolerance 1e-6 on every float, exact on
   clients, examples, steps and bytes); each node trains on its own file only, the server reads
   its own test file only (the audit logs show it), the nodes report their example counts. (It
   runs before test 2, which stops a node.)
2. A SuperNode terminated mid-run: the run finishes with the other two (min_available_clients: 2)
   and metrics.jsonl says which client was lost in which round.
3. A SuperNode whose key was never registered is turned away.

Slow by nature (Flower polls, and every message starts a fresh ClientApp process): tens of seconds
on an idle 2-core machine, minutes on a loaded one. No wall-clock time is asserted.
"""

from __future__ import annotations

import json
import os
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
from helpers import assert_same_length
from test_node_data import SIZES, local_config, natural_files, node_config

# one federation for the module; with the simulation tests, one Flower runtime at a time on the machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600), pytest.mark.xdist_group("flower-runtime")]

CLIENTS = 3
FLOAT_TOLERANCE = 1e-6
OPEN_LOG = "ATOLL_TEST_OPEN_LOG"
# put on a process's PYTHONPATH, this logs (pid, absolute path) of every file the process opens
AUDIT_HOOK = """
import os, sys
_log = os.environ.get("ATOLL_TEST_OPEN_LOG")
if _log:
    _fd = os.open(_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # before the hook: not logged

    def _opened(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            try:
                os.write(_fd, f"{os.getpid()} {os.path.abspath(os.fsdecode(args[0]))}\\n".encode("utf-8", "replace"))
            except Exception:
                pass

    sys.addaudithook(_opened)
"""


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
        self.files = natural_files(root)  # node files, their rows pooled with an owner column, the server's test file
        self.hook = root / "audit-hook"
        self.hook.mkdir()
        (self.hook / "sitecustomize.py").write_text(AUDIT_HOOK)

    def audited_env(self, home: Path, log: Path) -> dict[str, str]:
        env = flower_env(home)
        env["PYTHONPATH"] = str(self.hook) + os.pathsep + env.get("PYTHONPATH", "")
        env[OPEN_LOG] = str(log)
        return env

    def opened(self, who: str) -> set[Path]:
        """Every file the SuperLink's processes (``who="superlink"``) or a node's (``"node-<i>"``) opened so far."""
        path = self.root / f"opened-{who}.log"
        lines = path.read_text().splitlines() if path.is_file() else []
        return {Path(line.split(" ", 1)[1]).resolve() for line in lines if " " in line}

    def start(self) -> None:
        root = self.root
        subprocess.run(atoll_command("certs", self.certs, "--nodes", CLIENTS), check=True, capture_output=True)
        self.superlink = ManagedProcess(
            atoll_command("superlink", "--certs", self.certs, "--node-auth", "--host", "127.0.0.1", "--port", self.port),
            self.audited_env(root / "home-superlink", root / "opened-superlink.log"),
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
        node_files, _, _ = self.files
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
                "--data-file",
                node_files[partition],
            ),
            self.audited_env(self.root / f"home-node-{len(self.started)}", self.root / f"opened-node-{partition}.log"),
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


def test_a_personalized_algorithm_on_nodes_that_read_only_their_own_files_matches_the_local_engine(tmp_path, federation):
    """Two rounds of FedSA-LoRA (each client keeps its own B on its node from round 1 to round 2
    and to the final local evaluation) with flower.node_data: the metrics of the local engine over
    the same rows, the nodes' own example counts, and no file opened by anyone it does not belong to."""
    assert all(node.alive() for node in federation.nodes.values()), "this test needs all three nodes (it runs before one is stopped)"
    node_files, _, server_test = federation.files
    personalized = {"algorithm.name": "fedsa-lora", "run.plots": "false"}
    local_dir, local_summary = start_run(local_config(tmp_path / "local", federation.files, **personalized), Progress())
    settings = {
        **personalized,
        "flower.superlink": federation.address,
        "flower.insecure": "false",
        "flower.root_certificates": str(federation.certs / "ca.crt"),
        "flower.wait_timeout": 600,
        "flower.round_timeout": 900,
    }
    flower_dir, summary = start_run(node_config(tmp_path / "flower", federation.files, **settings), Progress())

    local_records, flower_records = records(local_dir.path), records(flower_dir.path)
    assert [r["round"] for r in flower_records] == [0, 1, 2]
    assert_same_length(flower_records, local_records, "metrics records")
    for flower, local in zip(flower_records, local_records, strict=True):
        details = flower.pop("flower", None)
        if flower["round"] > 0:
            timing = details.pop("clientapp_seconds")
            assert details == {"online": [0, 1, 2], "offline": [], "dropped": [], "failures": {}}
            assert sorted(timing) == ["0", "1", "2"] and all(t["since_start"] >= t["handling"] > 0 for t in timing.values())
        for record in (flower, local):
            record.pop("seconds", None)
            record.pop("wall_seconds", None)
        # FedSA-LoRA has no global model: its global column is every client's model on the global
        # test set, which the nodes do not hold (test_every_algorithm checks it without node data)
        assert not flower.pop("global", None), "a node-data run cannot evaluate personal models on the server's test set"
        local.pop("global", None)
        assert_close(flower, local, f"round {local['round']}")
    assert flower_records[-1]["local"]["accuracy"] >= 0 and flower_records[-1]["local"]["examples"] > 0
    assert_close(summary["final_local"], local_summary["final_local"], "final_local")
    assert not (flower_dir.path / "adapter").exists(), "FedSA-LoRA has no global adapter"
    reported = summary["engine"]["client_examples"]  # from the nodes: the server never counted their rows
    assert {int(c): n["train"] + n["test"] for c, n in reported.items()} == dict(enumerate(SIZES))

    server_opened = federation.opened("superlink")
    assert server_test.resolve() in server_opened, "the audit hook logs the ServerApp's opens (it read its own test set)"
    assert not {f.resolve() for f in node_files} & server_opened, "the server opened a client's file"
    for partition, own in enumerate(node_files):
        opened = federation.opened(f"node-{partition}")
        assert own.resolve() in opened, f"node {partition} read its own file"
        others = {f.resolve() for f in node_files} - {own.resolve()}
        assert not others & opened and server_test.resolve() not in opened, f"node {partition} opened data that is not its own"


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
