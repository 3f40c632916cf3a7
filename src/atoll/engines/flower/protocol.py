"""What the ServerApp and the ClientApps say to each other, in one place.

Messages (all carry ``client-id`` so a reply can be checked against the node that sent it):

- ``query``: no content; the reply names the node's ``partition-id`` and ``num-partitions`` and, in
  a node-data run (``flower.node_data``), its ``train-examples`` and ``test-examples`` or the
  ``problem`` that keeps it from serving.
- ``train`` (or ``train.clipfixed`` / ``train.clipadaptive`` under client-side DP): ``arrays`` =
  the download's tensors, ``config`` = round, client id and LoRA scales; the reply holds
  ``arrays`` (the upload), ``metrics`` (training metrics, ``num-examples``) and ``config`` (scales).
- ``evaluate``: like train plus ``scope`` (``local``: the client's own test split, ``global``: the
  global test set); the reply holds ``metrics``.

Replies' metrics also carry ``atoll.process-seconds`` (age of the ClientApp process) and
``atoll.handle-seconds`` (time in the handler); keys starting with ``atoll.`` never reach the
algorithm or the evaluation results.

The run itself is described by the run config: ``atoll-run`` (the resolved run, as
:meth:`atoll.resolve.ResolvedRun.to_json` wrote it: the ServerApp and every ClientApp take it as it
is and check nothing again) and ``atoll-run-dir`` (where the ServerApp writes the run directory).
"""

from __future__ import annotations

from pathlib import Path

from atoll.errors import ConfigError, UpdateError

RUN_KEY = "atoll-run"
RUN_DIR_KEY = "atoll-run-dir"
ACTION_CLIP_FIXED = "clipfixed"
ACTION_CLIP_ADAPTIVE = "clipadaptive"
ARRAYS, CONFIG, METRICS, INFO = "arrays", "config", "metrics", "info"


def run_config_for(run, run_dir: str | Path = "") -> dict[str, str]:
    """The Flower run config carrying a resolved run and its run directory."""
    return {RUN_KEY: run.to_json(), RUN_DIR_KEY: str(run_dir)}


def read_run_config(run_config) -> tuple[object, str]:
    """(ResolvedRun, run directory) from a Flower run config written by :func:`run_config_for`."""
    from atoll.resolve import ResolvedRun

    text = run_config.get(RUN_KEY)
    if not text:
        raise ConfigError(
            f"the Flower run config has no '{RUN_KEY}'",
            "start runs with `atoll run --engine flower` or an app from `atoll flower app`",
        )
    return ResolvedRun.from_json(str(text)), str(run_config.get(RUN_DIR_KEY, "") or "")


def query_message(node_id: int, ttl: float | None = None):
    from flwr.app import ConfigRecord, Message, RecordDict

    return Message(RecordDict({CONFIG: ConfigRecord({"want": "partition"})}), dst_node_id=node_id, message_type="query", ttl=ttl)


def query_reply(node_config) -> dict:
    """The query reply's entries (client side): the node's partition, as configured."""
    entries: dict = {"partition-id": -1, "num-partitions": -1}
    if "partition-id" in node_config:
        entries["partition-id"] = int(node_config["partition-id"])
    if "num-partitions" in node_config:
        entries["num-partitions"] = int(node_config["num-partitions"])
    return entries


def partition_problem(partition: int, partitions: int, num_clients: int) -> str:
    """Why a node with this partition cannot serve a run of ``num_clients`` clients ("" if it can)."""
    if partition < 0:
        return "it was started without partition-id in --node-config"
    if partitions not in (-1, num_clients):
        return f"it serves partition {partition} of {partitions}, but the run has {num_clients} clients"
    if not 0 <= partition < num_clients:
        return f"its partition-id {partition} is outside 0..{num_clients - 1}"
    return ""


def read_query_reply(content, num_clients: int, node_data: bool = False) -> tuple[int, str, tuple[int, int] | None]:
    """(client id, problem or "", (train, test) example counts in a node-data run) from a query reply."""
    info = content.config_records.get(INFO)
    if info is None:
        return -1, "its query reply carries no partition information", None
    partition, partitions = int(info["partition-id"]), int(info["num-partitions"])
    problem = partition_problem(partition, partitions, num_clients)
    if problem or not node_data:
        return partition, problem, None
    if info.get("problem"):
        return partition, str(info["problem"]), None
    if "train-examples" not in info:
        return partition, "it reports no example counts for its own data", None
    return partition, "", (int(info["train-examples"]), int(info["test-examples"]))


def evaluate_message(node_id: int, round: int, client_id: int, download, scope: str, ttl: float | None = None):
    from flwr.app import ConfigRecord, Message, RecordDict

    from atoll.engines.flower.codec import scales_to_config, split_state, tensors_to_arrays

    tensors, scales = split_state(download)
    entries = {"round": round, "client-id": client_id, "scope": scope}
    entries.update(scales_to_config(scales))
    content = RecordDict({ARRAYS: tensors_to_arrays(tensors), CONFIG: ConfigRecord(entries)})
    return Message(content, dst_node_id=node_id, message_type="evaluate", group_id=str(round), ttl=ttl)


def read_metrics(content, client_id: int) -> dict[str, float]:
    metrics = dict(content.metric_records[METRICS])
    sender = int(metrics.pop("client-id", -1))
    if sender != client_id:
        raise UpdateError(f"an evaluation reply meant for client {client_id} says it comes from client {sender}")
    return {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float)) and not key.startswith("atoll.")}


def timing_of(content) -> dict[str, float]:
    """The ClientApp's timing a reply reports: seconds since its process started and in the handler."""
    metrics = content.metric_records.get(METRICS, {})
    timing = {"since_start": metrics.get("atoll.process-seconds"), "handling": metrics.get("atoll.handle-seconds")}
    return {key: round(float(value), 3) for key, value in timing.items() if value is not None}
