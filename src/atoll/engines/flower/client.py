"""The ClientApp: the federation's client-side steps for the partition this SuperNode serves.

Every process builds the federation from the resolved run it is handed (``atoll.experiment.build``
is deterministic given the seed; nothing is checked again), so a node trains exactly what the
local engine would train for the same client, through the same behaviours and protection stages.
Built federations are cached per process (in simulation a Ray actor keeps its model across
rounds), and the prepared data per node on disk (:mod:`.node_cache`): in deployment every message
starts a fresh ClientApp process, which then loads the token ids and splits instead of reading
the source, loading the tokenizer and partitioning again. In a node-data run
(``flower.node_data``) the node's data is its own file (:mod:`.node_data`).

A client's private state (the entries it keeps in the ClientStore: personal adapters, control
variates) lives in ``context.state`` between messages: it is loaded into the store before the
client runs and written back after, so it survives rounds on its node in simulation and in
deployment alike, and never leaks to another client served by the same process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

from atoll.engines.flower import protocol
from atoll.errors import ConfigError

log = logging.getLogger("atoll.flower")

STORE_PREFIX = "atoll.store."
_EXPERIMENTS: dict[str, object] = {}


# -- the experiment of this process -------------------------------------------------------------------


def federation_for(context):
    """The Federation of this run on this node, built once per process from the resolved run it
    was handed and the node's cached data (:func:`.node_cache.node_data`)."""
    run_config, node_config = context.run_config, context.node_config
    text = str(run_config.get(protocol.RUN_KEY, ""))
    node_file = str(node_config.get("data-file", "")) if node_config is not None else ""
    key = hashlib.sha256(f"{text}\0{node_file}".encode()).hexdigest()
    if key not in _EXPERIMENTS:
        from atoll.engines.flower import node_cache
        from atoll.engines.flower.node_data import node_data_file
        from atoll.experiment import build
        from atoll.fl.federation import Federation

        for old in _EXPERIMENTS.values():
            old.experiment.close()
        _EXPERIMENTS.clear()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        run, _ = protocol.read_run_config(run_config)
        config = run.config
        if config.flower.node_data:
            client_id, path = client_id_of(node_config, config.federation.clients), node_data_file(node_config)
        else:
            client_id, path = -1, None
        # the client-side protection stages and attack behaviours (the ServerApp builds the server's)
        _EXPERIMENTS[key] = Federation(build(run, loaded=node_cache.node_data(config, client_id, path)), side="client")
    return _EXPERIMENTS[key]


def timing_metrics(started: float) -> dict[str, float]:
    """How long this ClientApp process has lived and how long the handler took (recorded by the
    server under ``flower.clientapp_seconds``; ``atoll.`` keys never reach the algorithm)."""
    import psutil

    now = time.time()
    return {"atoll.process-seconds": now - psutil.Process().create_time(), "atoll.handle-seconds": time.perf_counter() - started}


def client_id_of(node_config, num_clients: int) -> int:
    """This node's client id: its ``partition-id`` (checked against the federation size)."""
    entries = protocol.query_reply(node_config)
    problem = protocol.partition_problem(entries["partition-id"], entries["num-partitions"], num_clients)
    if problem:
        raise ConfigError(
            f"this SuperNode cannot serve the run: {problem}", "start it with --node-config 'partition-id=I num-partitions=N'"
        )
    return entries["partition-id"]


# -- private state in context.state -------------------------------------------------------------------


def load_private_state(store, state) -> None:
    """Make the ClientStore hold exactly the entries saved in ``state`` (a RecordDict)."""
    from atoll.engines.flower.codec import arrays_to_tensors

    for client_id in store.client_ids():
        store.discard(client_id)
    for key, record in state.array_records.items():
        if key.startswith(STORE_PREFIX):
            store.put(int(key[len(STORE_PREFIX) :]), arrays_to_tensors(record))


def save_private_state(store, state) -> None:
    """Write every ClientStore entry into ``state`` (replacing what it held), then empty the store."""
    from atoll.engines.flower.codec import tensors_to_arrays

    for key in [k for k in state.array_records if k.startswith(STORE_PREFIX)]:
        del state[key]
    for client_id in store.client_ids():
        state[STORE_PREFIX + str(client_id)] = tensors_to_arrays(store.get(client_id))
        store.discard(client_id)


MEMORY_PREFIX = "atoll.memory."


def recall_memory(federation, client_id: int, state) -> None:
    """Hand ``client_id``'s behaviour what it kept on this node (a stale free rider's last download)."""
    from atoll.engines.flower.codec import state_from_records

    memory = {}
    for key, record in state.array_records.items():
        if key.startswith(MEMORY_PREFIX):
            name = key[len(MEMORY_PREFIX) :]
            memory[name] = state_from_records(record, state.config_records.get(key + ".scales", {}))
    federation.stages.recall(client_id, memory)


def keep_memory(federation, client_id: int, state) -> None:
    """Store what ``client_id``'s behaviour keeps between its rounds in the node's state (replacing the old)."""
    from flwr.app import ConfigRecord

    from atoll.engines.flower.codec import state_to_records

    for key in [k for k in list(state.array_records) + list(state.config_records) if k.startswith(MEMORY_PREFIX)]:
        del state[key]
    for name, kept in federation.stages.memory(client_id).items():
        arrays, scales = state_to_records(kept)
        state[MEMORY_PREFIX + name] = arrays
        state[MEMORY_PREFIX + name + ".scales"] = ConfigRecord(scales)


def _check_client(federation, context, claimed: int) -> int:
    client_id = client_id_of(context.node_config, federation.config.federation.clients)
    if claimed != client_id:
        raise ConfigError(f"this SuperNode serves client {client_id}, but the server addressed client {claimed}")
    return client_id


def run_client(federation, context, client_id: int, round: int, download):
    """The federation's client-side step (behaviour, training, stages before upload) with the
    node's private state (the client's ClientStore entry, its behaviour's memory) loaded before
    and saved after (on success)."""
    _check_client(federation, context, client_id)
    store = federation.experiment.store
    load_private_state(store, context.state)
    recall_memory(federation, client_id, context.state)
    try:
        update = federation.train(round, client_id, download)
    except BaseException:
        for stale in store.client_ids():
            store.discard(stale)
        raise
    save_private_state(store, context.state)
    keep_memory(federation, client_id, context.state)
    return update


def evaluate_client(federation, context, client_id: int, download, scope: str) -> dict[str, float]:
    _check_client(federation, context, client_id)
    store = federation.experiment.store
    load_private_state(store, context.state)
    try:
        return federation.evaluate_client(0, client_id, download, scope)
    finally:
        for stale in store.client_ids():
            store.discard(stale)


# -- handlers -----------------------------------------------------------------------------------------


def handle_train(msg, context):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from atoll.engines.flower.codec import (
        arrays_to_tensors,
        ordered_like,
        scales_to_config,
        split_state,
        state_from_records,
        tensors_to_arrays,
    )

    if "fitins.parameters" in msg.content.array_records:
        return handle_secagg_train(msg, context)
    started = time.perf_counter()
    federation = federation_for(context)
    config = msg.content.config_records[protocol.CONFIG]
    arrays = msg.content.array_records[protocol.ARRAYS]
    download = state_from_records(arrays, config)
    client_id, round = int(config["client-id"]), int(config["round"])
    update = run_client(federation, context, client_id, round, download)
    tensors, scales = split_state(update.state)
    tensors = ordered_like(tensors, list(arrays_to_tensors(arrays)))
    metrics = {k: float(v) for k, v in update.metrics.items()}
    metrics.update({"client-id": client_id, "num-examples": int(update.num_examples)})
    metrics.update(timing_metrics(started))
    content = RecordDict(
        {
            protocol.ARRAYS: tensors_to_arrays(tensors),
            protocol.METRICS: MetricRecord(metrics),
            protocol.CONFIG: ConfigRecord(scales_to_config(scales)),
        }
    )
    return Message(content, reply_to=msg)


def handle_secagg_train(msg, context):
    """The SecAgg+ collect stage hands the legacy FitIns to the app; answer with a legacy FitRes."""
    from flwr.app import Message
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from atoll.engines.flower.codec import state_from_legacy, state_to_legacy
    from atoll.engines.flower.strategy import META

    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    federation = federation_for(context)
    client_id, round = int(fitins.config["atoll.client-id"]), int(fitins.config["atoll.round"])
    download = state_from_legacy(parameters_to_ndarrays(fitins.parameters), str(fitins.config[META]))
    update = run_client(federation, context, client_id, round, download)
    arrays, description = state_to_legacy(update.state)
    metrics = {k: float(v) for k, v in update.metrics.items()}
    metrics.update({"client-id": client_id, "num-examples": int(update.num_examples), META: description})
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), int(update.num_examples), metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def handle_evaluate(msg, context):
    from flwr.app import Message, MetricRecord, RecordDict

    from atoll.engines.flower.codec import state_from_records

    started = time.perf_counter()
    federation = federation_for(context)
    config = msg.content.config_records[protocol.CONFIG]
    download = state_from_records(msg.content.array_records[protocol.ARRAYS], config)
    client_id = int(config["client-id"])
    metrics = evaluate_client(federation, context, client_id, download, str(config.get("scope", "local")))
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    values["client-id"] = client_id
    values.update(timing_metrics(started))
    return Message(RecordDict({protocol.METRICS: MetricRecord(values)}), reply_to=msg)


def handle_query(msg, context):
    """The node's partition (and in a node-data run its example counts, read from its own file)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from atoll.engines.flower.node_data import query_entries

    entries = protocol.query_reply(context.node_config)
    entries.update(query_entries(context.run_config, context.node_config))
    return Message(RecordDict({protocol.INFO: ConfigRecord(entries)}), reply_to=msg)


def secagg_when_asked(msg, context, call_next):
    """Flower's secaggplus_mod for the messages of a SecAgg+ round; everything else passes."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def make_client_app():
    from flwr.clientapp import ClientApp
    from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

    app = ClientApp(mods=[secagg_when_asked])
    app.train()(handle_train)
    app.train(protocol.ACTION_CLIP_FIXED, mods=[fixedclipping_mod])(handle_train)
    app.train(protocol.ACTION_CLIP_ADAPTIVE, mods=[adaptiveclipping_mod])(handle_train)
    app.evaluate()(handle_evaluate)
    app.query()(handle_query)
    return app
