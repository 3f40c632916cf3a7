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

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto

from atoll.config import config_with
from atoll.engines.flower import protocol
from atoll.errors import AlgorithmError, AtollError
from atoll.resolve import resolve
from conftest import tiny_overrides
from helpers import (
    aggregates_by_weighted_mean,
    algorithm_case,
    algorithm_names,
    assert_same_length,
    forget_flower_client_experiments,
    read_records,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("flower_isolation")]

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
    return read_records(run_dir, drop=("seconds", "wall_seconds", "flower"))


def assert_close(got, expected, where=""):
    if isinstance(expected, dict):
        assert set(got) == set(expected), where
        for key in expected:
            assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=TOLERANCE), where
    else:
        assert got == expected, where


@pytest.mark.parametrize("name", [n for n in algorithm_names() if n != "centralized"])
def test_algorithm_runs_unchanged_on_the_flower_engine(tmp_path, reference_runs, plain_bert, name):
    case = algorithm_case(name, plain_bert)  # the local run the run-directory tests reload too
    local = reference_runs.get(**case)
    flower_config = config_with(tiny_overrides(tmp_path / "flower", **case, **{"engine": "flower", "run.plots": "false"}))
    forget_flower_client_experiments()
    run_on_flower(flower_config, tmp_path / "flower")
    local_records, flower = task_records(local), task_records(tmp_path / "flower")
    assert len(flower) == len(local_records) == 3
    for got, expected in zip(flower, local_records, strict=True):
        assert_close(got, expected, f"{name} round {expected['round']}")
    assert (tmp_path / "flower" / "summary.json").is_file()
    if name == "fedex-lora":  # from round 2 on, downloads carry round 1's residual: a dense matrix per adapted module
        assert flower[2]["bytes_down"] > 2 * flower[1]["bytes_down"]
        assert (tmp_path / "flower" / "adapter" / "base_delta.safetensors").is_file()


MEAN_ALGORITHMS = [n for n in algorithm_names() if n != "centralized" and aggregates_by_weighted_mean(n)]
# mean aggregators whose clients download something other than the global adapter, which Flower's
# DP wrappers (clipping each update against one global model) cannot serve, pinned by name: RAVAN
# sends its trainable cores, not the adapter its server evaluates. Any other refusal fails the test.
DP_REFUSERS = {"ravan"}
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
def test_mean_algorithms_under_secagg_and_inactive_dp_match_the_local_engine(tmp_path, reference_runs, name, privacy):
    settings, tolerance = PRIVACY[privacy]
    extra = {"algorithm.name": name, "eval.local": "never", "federation.rounds": 2, "train.local_steps": 2}
    local = task_records(reference_runs.get(**extra))  # one local run per algorithm for every privacy setting
    flower_config = config_with(tiny_overrides(tmp_path / "flower", **extra, **settings, **{"engine": "flower", "run.plots": "false"}))
    forget_flower_client_experiments()
    if privacy.startswith("dp") and name in DP_REFUSERS:
        with pytest.raises(AlgorithmError, match="differs from the global adapter"):
            run_on_flower(flower_config, tmp_path / "flower")
        return
    run_on_flower(flower_config, tmp_path / "flower")  # any other refusal is a failure
    flower = task_records(tmp_path / "flower")
    assert_same_length(flower, local, "metrics records")
    assert flower[1]["train"] == local[1]["train"]
    for got, expected in zip(flower, local, strict=True):
        if tolerance == TOLERANCE:
            assert_close(got, expected, f"{name} {privacy} round {expected['round']}")
        else:
            assert got["global"]["loss"] == pytest.approx(expected["global"]["loss"], abs=tolerance)
            assert got.get("train", {}).get("loss", 0.0) == pytest.approx(expected.get("train", {}).get("loss", 0.0), abs=tolerance)
            assert got["bytes_up"] == expected["bytes_up"] and got["bytes_down"] == expected["bytes_down"]
