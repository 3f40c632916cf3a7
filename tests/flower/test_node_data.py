"""Data that never moves (flower.node_data), without Flower processes: every SuperNode builds its
client from its own file and nothing else, the server from its own test set at most, and the
nodes' ClientApps train exactly what the local engine trains with the natural partition of the
same files. Also the per-node cache a fresh ClientApp process loads instead of rebuilding.

The deployment itself (a SuperLink and three SuperNodes, with an audit hook showing which files
each process opened) is in test_deployment.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from flwr.app import ConfigRecord, Context, RecordDict

from atoll.config import config_with
from atoll.engines.flower import client as flower_client
from atoll.engines.flower import protocol
from atoll.engines.flower.strategy import update_from_reply
from atoll.errors import ConfigError, DataError
from atoll.experiment import build
from atoll.resolve import check, resolve
from conftest import tiny_overrides
from helpers import forget_flower_client_experiments
from test_flower_units import assert_same_state, fresh_process_context, train_message

pytestmark = pytest.mark.usefixtures("flower_isolation")

SIZES = (70, 60, 50)  # distinct sizes: the natural partition gives the largest file client 0, and so on
LABELS = ["food", "sports", "weather"]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def natural_files(root):
    """Three node files cut from the synthetic topic task, the same rows concatenated with an
    ``owner`` column (the local run's source), and the server's own test file."""
    from atoll.data.sources import load_source

    raw = load_source("synthetic-cls")
    rows = [{"text": t, "label": y} for t, y in zip(raw.columns["text"], raw.columns["label"], strict=True)]
    files, pooled, start = [], [], 0
    for node, size in enumerate(SIZES):
        part = rows[start : start + size]
        start += size
        files.append(write_rows(root / f"node-{node}.jsonl", part))
        pooled += [{**row, "owner": f"node-{node}"} for row in part]
    return files, write_rows(root / "pooled.jsonl", pooled), write_rows(root / "server-test.jsonl", rows[start : start + 40])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return natural_files(tmp_path_factory.mktemp("node-data"))


def shared_settings(files, **extra) -> dict:
    node_files, _, test_file = files
    return {
        "federation.clients": 3,
        "data.task": "classification",
        "data.labels": "[" + ", ".join(LABELS) + "]",
        "data.test_source": str(test_file),
        "data.max_examples": "null",
        "eval.local": "final",
        **extra,
    }


def local_config(root, files, **extra):
    """The local engine over the same rows: one pooled file, split by the file each row came from."""
    _, pooled, _ = files
    settings = {"data.source": str(pooled), "partition.name": "natural", "partition.column": "owner", **shared_settings(files, **extra)}
    return config_with(tiny_overrides(root, **settings))


def node_config(root, files, **extra):
    settings = {
        "engine": "flower",
        "flower.mode": "deployment",
        "flower.superlink": "127.0.0.1:9093",
        "flower.insecure": "true",
        "flower.node_data": "true",
        **shared_settings(files, **extra),
    }
    return config_with(tiny_overrides(root, **settings))


def node_context(run_config, client_id, data_file, partitions=3) -> Context:
    node_config = {"partition-id": client_id, "num-partitions": partitions}
    if data_file is not None:
        node_config["data-file"] = str(data_file)
    return Context(run_id=1, node_id=100 + client_id, node_config=node_config, state=RecordDict(), run_config=run_config)


def query_info(context) -> dict:
    """The node's answer to the server's partition query, through the ClientApp's handler."""
    message = protocol.query_message(context.node_id)
    message.metadata.__dict__["_message_id"] = message.object_id
    reply = flower_client.handle_query(message, context)
    return dict(reply.content.config_records[protocol.INFO])


# -- what the config must fix -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"flower.mode": "simulation", "flower.superlink": "null", "flower.insecure": "false"}, "needs flower.mode: deployment"),
        ({"data.task": "auto"}, "set data.task"),
        ({"data.labels": "null"}, "label set must be fixed"),
        ({"data.max_examples": 100}, "each node uses its whole file"),
        ({"data.validation_size": 10}, "no one holds the pool"),
    ],
)
def test_what_a_server_without_data_must_be_told_is_a_one_line_config_error(tmp_path, files, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        check(node_config(tmp_path, files, **overrides))
    assert "\n" not in str(error.value)


def test_a_fixed_label_set_gives_the_class_ids_and_refuses_labels_outside_it(tmp_path):
    from atoll.data.sources import RawData
    from atoll.data.tasks import resolve_task

    raw = RawData(
        {"text": ["a", "b", "c"], "label": ["sports", "food", "sports"]}, "classification", {"text_column": "text", "label_column": "label"}
    )
    fixed = config_with(["data.labels=[weather, sports, food]"]).data
    assert resolve_task(fixed, raw).label_names == ["weather", "sports", "food"]  # not sorted: the order given
    assert resolve_task(config_with([]).data, raw).label_names == ["food", "sports"]  # default: sorted values found
    with pytest.raises(DataError, match="outside the label set: 'food'"):
        resolve_task(config_with(["data.labels=[weather, sports]"]).data, raw)
    with pytest.raises(DataError, match="twice"):
        resolve_task(config_with(["data.labels=[food, food, sports]"]).data, raw)


# -- nodes train what the local engine trains ---------------------------------------------------------


def test_each_node_trains_what_the_local_engine_trains_with_the_natural_partition_of_the_same_files(tmp_path, files):
    node_files, _, test_file = files
    local = build(local_config(tmp_path / "local", files))
    try:
        splits = local.splits
        test_rows = len(test_file.read_text().splitlines())
        assert list(splits.global_test) == list(range(sum(SIZES), sum(SIZES) + test_rows)), "the global test set is data.test_source"
        assert local.spec.label_names == LABELS
        run_config = protocol.run_config_for(resolve(node_config(tmp_path / "nodes", files)))
        for client_id, data_file in enumerate(node_files):
            context = node_context(run_config, client_id, data_file)
            info = query_info(context)
            assert (info["train-examples"], info["test-examples"]) == (
                len(splits.client_train[client_id]),
                len(splits.client_test[client_id]),
            )
            reply = flower_client.handle_train(train_message(local, 1, client_id, 100 + client_id), context)
            remote = update_from_reply(reply.content, client_id)
            expected = local.clients[client_id].run(1, local.server.configure(1, client_id))
            assert remote.num_examples == expected.num_examples
            assert remote.metrics == expected.metrics, client_id
            assert_same_state(remote.state, expected.state)
            experiment = flower_client.federation_for(context).experiment
            assert experiment.splits.global_test.size == 0, "a node holds no global test set"
            assert sum(len(t) for t in experiment.splits.client_train) == len(splits.client_train[client_id]), "nor another client's rows"
            trained = expected.state  # evaluated on the node's own test split and on the local engine's
            local_metrics = local.clients[client_id].evaluate(trained, None)
            assert (
                flower_client.evaluate_client(flower_client.federation_for(context), context, client_id, trained, "local") == local_metrics
            )
            forget_flower_client_experiments()
    finally:
        local.close()


def test_a_node_says_why_it_cannot_serve_in_its_query_reply(tmp_path, files):
    node_files, _, _ = files
    run_config = protocol.run_config_for(resolve(node_config(tmp_path, files)))
    assert "no 'data-file'" in query_info(node_context(run_config, 0, None))["problem"]
    odd = write_rows(tmp_path / "odd.jsonl", [{"text": "a b c", "label": "music"}] * 8)
    assert "outside the label set: 'music'" in query_info(node_context(run_config, 0, odd))["problem"]
    few = write_rows(tmp_path / "few.jsonl", [{"text": "a b c", "label": "food"}] * 2)
    assert "fewer than partition.min_examples" in query_info(node_context(run_config, 0, few))["problem"]
    info = ConfigRecord({"partition-id": 0, "num-partitions": 3, "problem": "its file is gone"})
    assert protocol.read_query_reply(RecordDict({protocol.INFO: info}), 3, node_data=True) == (0, "its file is gone", None)


def test_the_server_of_a_node_data_run_holds_its_test_set_and_the_counts_its_nodes_report(tmp_path, files):
    from atoll.engines.flower.server_data import NodeDataFederation, load_server_data, make_federation
    from atoll.fl.federation import InProcessClients

    node_files, _, test_file = files
    config = node_config(tmp_path, files)
    experiment = build(resolve(config), loaded=load_server_data(config))
    try:
        federation = make_federation(experiment)
        assert isinstance(federation, NodeDataFederation)
        assert len(experiment.data) == len(experiment.splits.global_test) == len(test_file.read_text().splitlines())
        assert all(len(t) == 0 for t in experiment.splits.client_train + experiment.splits.client_test)
        assert experiment.splits.label_table is None
        assert federation.local_client_ids() == [], "no client is known before its node answers"
        federation.report_counts(1, 48, 12)
        federation.report_counts(2, 40, 0)
        assert federation.server.context.client_sizes == [0, 48, 40]
        assert federation.local_client_ids() == [1]

        class Answers(InProcessClients):
            def evaluate(self, round, client_ids, scope):
                return {c: {"accuracy": 0.5, "examples": 12.0} for c in client_ids}

        assert federation.local_evaluation(1, Answers(federation))["examples"] == 12.0  # weighted by the reported test count
    finally:
        experiment.close()


# -- the per-node cache ---------------------------------------------------------------------------------


def test_a_fresh_process_loads_the_node_cache_instead_of_the_source_and_the_tokenizer(tmp_path, files, monkeypatch):
    from atoll.data import sources
    from atoll.models import registry

    node_files, _, _ = files
    local = build(local_config(tmp_path / "local", files))
    try:
        data_file = tmp_path / "node-1.jsonl"
        data_file.write_text(node_files[1].read_text())
        run_config = protocol.run_config_for(resolve(node_config(tmp_path / "nodes", files)))
        context = node_context(run_config, 1, data_file)
        first = update_from_reply(flower_client.handle_train(train_message(local, 1, 1, 101), context).content, 1)

        def refuse(*args, **kwargs):
            raise AssertionError("a cached node read its data again")

        with monkeypatch.context() as patch:
            patch.setattr(sources, "load_local_file", refuse)
            patch.setattr(sources, "load_source", refuse)
            patch.setattr(registry, "load_tokenizer", refuse)
            again = update_from_reply(
                flower_client.handle_train(train_message(local, 1, 1, 101), fresh_process_context(context)).content, 1
            )
        assert again.metrics == first.metrics
        assert_same_state(again.state, first.state)
        tokenizer = flower_client.federation_for(context).experiment.workbench.tokenizer
        assert tokenizer.decode([tokenizer.pad_token_id]).strip() == "[PAD]", "anything beyond the ids loads the real tokenizer"

        lines = data_file.read_text().splitlines()
        data_file.write_text("\n".join(lines[:-5]) + "\n")  # the node's file changed: its cache entry no longer applies
        forget_flower_client_experiments()
        changed = update_from_reply(flower_client.handle_train(train_message(local, 1, 1, 101), context).content, 1)
        assert changed.num_examples < first.num_examples
    finally:
        local.close()


def test_a_pooled_run_caches_its_data_once_for_every_node(tmp_path, monkeypatch):
    from atoll.data import sources

    config = config_with(tiny_overrides(tmp_path, **{"engine": "flower", "run.plots": "false"}))
    run_config = protocol.run_config_for(resolve(config))
    local = build(config)
    try:
        first = update_from_reply(
            flower_client.handle_train(train_message(local, 1, 2, 12), node_context(run_config, 2, None, partitions=4)).content, 2
        )
        forget_flower_client_experiments()
        with monkeypatch.context() as patch:
            patch.setattr(sources, "load_source", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read the source again")))
            other = node_context(run_config, 3, None, partitions=4)
            reply = flower_client.handle_train(train_message(local, 1, 3, 13), other)  # another node, same entry
        expected = local.clients[3].run(1, local.server.configure(1, 3))
        assert update_from_reply(reply.content, 3).metrics == expected.metrics
        assert first.metrics == local.clients[2].run(1, local.server.configure(1, 2)).metrics
    finally:
        local.close()


def test_a_data_file_path_survives_flowers_node_config_parser(tmp_path):
    from flwr.common.config import parse_config_args

    from atoll.engines.flower.processes import supernode_command

    for name in ("plain.jsonl", "with space.jsonl", "it's.jsonl"):
        path = tmp_path / name
        path.write_text("{}\n")
        command = supernode_command("127.0.0.1:9093", 1, 3, 9100, insecure=True, data_file=path)
        parsed = parse_config_args([command[command.index("--node-config") + 1]])
        assert parsed == {"partition-id": 1, "num-partitions": 3, "data-file": str(path)}
    with pytest.raises(ConfigError, match="does not exist"):
        supernode_command("127.0.0.1:9093", 1, 3, 9100, insecure=True, data_file=tmp_path / "missing.jsonl")


def test_a_cached_tokenizer_reports_the_ids_without_loading_anything():
    from atoll.engines.flower.node_cache import CachedTokenizer

    loads = []
    tokenizer = CachedTokenizer({"pad_token_id": 0, "bos_token_id": None, "eos_token_id": 2, "length": 9}, lambda: loads.append(1) or torch)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer)) == (0, 2, 9)
    assert loads == []
    assert tokenizer.float32 is torch.float32 and loads == [1]  # any other attribute comes from the real object, loaded once
    assert tokenizer.int64 is torch.int64 and loads == [1]
