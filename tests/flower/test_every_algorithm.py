"""Every registered algorithm, unchanged, through the Flower engine's ServerApp and ClientApp gives
the local engine's metrics.

Flower's transport is replaced by an in-process Grid that hands each message to the real
``client_app`` (mods included) with a per-node Context that goes through protobuf between
messages, as a SuperNode's does. The ClientApp side keeps one experiment for all nodes (as a Ray
actor serving many virtual nodes would), separate from the ServerApp's: an algorithm whose client
reads server state other than through its download, or keeps private state anywhere but the
ClientStore, shows up here as a mismatch.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.common.serde import context_from_proto, context_to_proto  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from atoll.algorithms import available  # noqa: E402
from atoll.config import config_with  # noqa: E402
from atoll.engines.flower import client as flower_client  # noqa: E402
from atoll.engines.flower import protocol  # noqa: E402
from atoll.algorithms import specs  # noqa: E402
from atoll.resolve import resolve  # noqa: E402
from atoll.errors import AlgorithmError, AtollError  # noqa: E402
from atoll.report.progress import Progress  # noqa: E402
from atoll.dispatch import start_run  # noqa: E402
from conftest import tiny_overrides  # noqa: E402

pytestmark = pytest.mark.slow

TaskIdentity.run_id = 1
TaskIdentity.task_id = 1
TaskIdentity.node_id = 0
TOLERANCE = 1e-6


def over_the_wire(message: Message) -> Message:
    """The message as a node receives it: deflated to bytes and inflated again (its own copy)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    contents = {object_id: obj.deflate() for object_id, obj in get_all_nested_objects(message).items()}
    received = inflate_object_from_contents(message.object_id, contents)
    received.metadata.__dict__["_message_id"] = message.metadata.message_id
    return received


class InProcessGrid:
    """Flower's Grid with the ClientApp called in this process; node ``100 + i`` serves partition i."""

    def __init__(self, run_config, clients: int):
        from atoll.engines.flower.app import client_app

        self.client_app = client_app
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": clients},
                state=RecordDict(),
                run_config=run_config,
            )
            for i in range(clients)
        }
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return sorted(self.contexts)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            node = message.metadata.dst_node_id
            delivered = over_the_wire(message)
            try:
                reply = self.client_app(delivered, self.contexts[node])
            except AtollError as error:
                reply = Message(Error(code=0, reason=str(error)), reply_to=message)
            self.contexts[node] = context_from_proto(context_to_proto(self.contexts[node]))  # as a SuperNode stores it
            self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))


def run_on_flower(config, run_dir):
    from atoll.engines.flower.server import run_server

    run_config = protocol.run_config_for(resolve(config), run_dir)
    grid = InProcessGrid(run_config, config.federation.clients)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    run_server(grid, context)


def task_records(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in ("seconds", "wall_seconds", "flower"):
            record.pop(key, None)
        out.append(record)
    return out


def assert_close(got, expected, where=""):
    if isinstance(expected, dict):
        assert set(got) == set(expected), where
        for key in expected:
            assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=TOLERANCE), where
    else:
        assert got == expected, where


RANK_CYCLE = {"native", "pad"}


@pytest.mark.parametrize("name", [n for n in available() if n != "centralized"])
def test_algorithm_runs_unchanged_on_the_flower_engine(tmp_path, name):
    server_cls = available()[name]
    extra = {"algorithm.name": name, "eval.local": "final", "federation.rounds": 2, "federation.sample_rate": 0.75}
    if server_cls.capabilities.mixed_ranks in RANK_CYCLE:
        extra["model.lora.client_ranks"] = "{1: 4}"  # mixed ranks where the algorithm supports them
    local_config = config_with(tiny_overrides(tmp_path / "local", **extra, **{"run.dir": str(tmp_path / "local")}))
    start_run(local_config, Progress())  # every algorithm runs this config locally: a failure is a regression, not a skip
    flower_config = config_with(tiny_overrides(tmp_path / "flower", **extra, **{"engine": "flower"}))
    flower_client._EXPERIMENTS.clear()
    run_on_flower(flower_config, tmp_path / "flower")
    local, flower = task_records(tmp_path / "local"), task_records(tmp_path / "flower")
    assert len(flower) == len(local) == 3
    for got, expected in zip(flower, local, strict=True):
        assert_close(got, expected, f"{name} round {expected['round']}")
    assert (tmp_path / "flower" / "summary.json").is_file()


MEAN_ALGORITHMS = [n for n, spec in specs().items() if spec.capabilities.weighted_mean and not spec.capabilities.pooled_data]
PRIVACY = {
    # SecAgg+ quantizes uploads (2**22 levels over [-8, 8]): agreement to 1e-4
    "secagg": ({"flower.secagg.enabled": "true"}, 1e-4),
    # DP wrappers with a bound no update reaches, no noise and the local engine's example weights:
    # the same numbers, through Flower's code
    "dp-server": (
        {
            "flower.dp.mode": "server-fixed",
            "flower.dp.weighting": "examples",
            "flower.dp.clipping_norm": 1e6,
            "flower.dp.noise_multiplier": 0.0,
        },
        TOLERANCE,
    ),
    "dp-client": (
        {
            "flower.dp.mode": "client-fixed",
            "flower.dp.weighting": "examples",
            "flower.dp.clipping_norm": 1e6,
            "flower.dp.noise_multiplier": 0.0,
        },
        TOLERANCE,
    ),
    "dp-server-adaptive": (
        {
            "flower.dp.mode": "server-adaptive",
            "flower.dp.weighting": "examples",
            "flower.dp.clipping_norm": 1e6,
            "flower.dp.noise_multiplier": 0.0,
        },
        TOLERANCE,
    ),
    "dp-client-adaptive": (
        {
            "flower.dp.mode": "client-adaptive",
            "flower.dp.weighting": "examples",
            "flower.dp.clipping_norm": 1e6,
            "flower.dp.noise_multiplier": 0.0,
        },
        TOLERANCE,
    ),
}
CASES = [(name, privacy) for name in MEAN_ALGORITHMS for privacy in ("secagg", "dp-server", "dp-client")]
CASES += [("fedit", "dp-server-adaptive"), ("fedit", "dp-client-adaptive")]


@pytest.mark.parametrize("name, privacy", CASES)
def test_mean_algorithms_under_secagg_and_inactive_dp_match_the_local_engine(tmp_path, name, privacy):
    settings, tolerance = PRIVACY[privacy]
    extra = {"algorithm.name": name, "eval.local": "never", "federation.rounds": 2}
    start_run(config_with(tiny_overrides(tmp_path / "local", **extra, **{"run.dir": str(tmp_path / "local")})), Progress())
    flower_config = config_with(tiny_overrides(tmp_path / "flower", **extra, **settings, **{"engine": "flower"}))
    flower_client._EXPERIMENTS.clear()
    try:
        run_on_flower(flower_config, tmp_path / "flower")
    except AlgorithmError as error:  # the one refusal allowed: DP needs every client to download the global adapter
        assert privacy.startswith("dp") and "differs from the global adapter" in str(error), error
        return
    local, flower = task_records(tmp_path / "local"), task_records(tmp_path / "flower")
    assert flower[1]["train"] == local[1]["train"]
    for got, expected in zip(flower, local, strict=True):
        if tolerance == TOLERANCE:
            assert_close(got, expected, f"{name} {privacy} round {expected['round']}")
        else:
            assert got["global"]["loss"] == pytest.approx(expected["global"]["loss"], abs=tolerance)
            assert got.get("train", {}).get("loss", 0.0) == pytest.approx(expected.get("train", {}).get("loss", 0.0), abs=tolerance)
            assert got["bytes_up"] == expected["bytes_up"] and got["bytes_down"] == expected["bytes_down"]
