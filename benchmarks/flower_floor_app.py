"""The floor of a Flower deployment's per-message cost: a bare ClientApp that imports torch and
transformers, loads the model an atoll run uses, and echoes its download; and a ServerApp that
sends one such message per node and round and times each exchange the way atoll's ServerApp does.

Used by ``benchmarks/flower_overhead.py --deployment`` (copied into a Flower app directory of its
own; it imports nothing from atoll). Run config keys: ``rounds``, ``nodes``, ``payload-floats``
(the download's size), ``model-kind`` (``config``: random init from a config.json directory;
``pretrained``: weights from a directory), ``model-path``, ``generative``, ``num-labels``,
``threads`` and ``output`` (where the ServerApp writes its timings as JSON).
"""

from __future__ import annotations

import json
import time

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

POLL_SECONDS = 0.5  # as atoll's ServerApp polls for replies

client_app = ClientApp()
server_app = ServerApp()


@client_app.train()
def train(msg, context):
    started = time.perf_counter()
    import psutil
    import torch
    import transformers

    config = context.run_config
    torch.set_num_threads(int(config["threads"]))
    auto = transformers.AutoModelForCausalLM if config["generative"] else transformers.AutoModelForSequenceClassification
    extra = {} if config["generative"] else {"num_labels": int(config["num-labels"])}
    if config["model-kind"] == "config":
        model = auto.from_config(transformers.AutoConfig.from_pretrained(str(config["model-path"]), **extra))
    else:
        model = auto.from_pretrained(str(config["model-path"]), **extra)
    metrics = {
        "parameters": float(sum(p.numel() for p in model.parameters())),
        "process-seconds": time.time() - psutil.Process().create_time(),
        "handle-seconds": time.perf_counter() - started,
    }
    return Message(RecordDict({"arrays": msg.content.array_records["arrays"], "metrics": MetricRecord(metrics)}), reply_to=msg)


@server_app.main()
def main(grid, context) -> None:
    import numpy as np

    config = context.run_config
    nodes_needed, rounds = int(config["nodes"]), int(config["rounds"])
    deadline = time.monotonic() + 600
    while len(list(grid.get_node_ids())) < nodes_needed:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {nodes_needed} nodes online")
        time.sleep(1.0)
    nodes = sorted(grid.get_node_ids())[:nodes_needed]
    payload = ArrayRecord([np.zeros(int(config["payload-floats"]), dtype=np.float32)])
    results = []
    for round in range(1, rounds + 1):
        started = time.perf_counter()
        messages = [Message(RecordDict({"arrays": payload}), dst_node_id=n, message_type="train", group_id=str(round)) for n in nodes]
        pending = {message_id for message_id in grid.push_messages(messages) if message_id}
        clients = []
        while pending:
            for reply in grid.pull_messages(list(pending)):
                pending.discard(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    raise RuntimeError(f"a floor ClientApp failed: {reply.error.reason}")
                metrics = reply.content.metric_records["metrics"]
                clients.append({"since_start": float(metrics["process-seconds"]), "handling": float(metrics["handle-seconds"])})
            if pending:
                time.sleep(POLL_SECONDS)
        results.append({"round": round, "exchange_seconds": time.perf_counter() - started, "clients": clients})
    with open(str(config["output"]), "w") as handle:
        json.dump(results, handle)
