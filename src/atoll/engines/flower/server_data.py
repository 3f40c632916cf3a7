"""The server of a node-data run (``flower.node_data``, see :mod:`.node_data`): its own test set at
most, and a federation whose client sizes are what the nodes report."""

from __future__ import annotations

import numpy as np

from atoll.engines.flower.node_data import empty_splits, fixed_tokenizer
from atoll.fl.federation import Federation


def server_task(config):
    """The task as the run config fixes it, for a server without data."""
    from atoll.data.tasks import TaskSpec

    data = config.data
    labels = [str(v) for v in data.labels or []]
    if data.task == "classification":
        return TaskSpec("classification", data.text_column, data.label_column, label_names=labels)
    return TaskSpec(data.task, prompt_column=data.prompt_column, response_column=data.response_column)


def load_server_data(config):
    """The ServerApp's data in a node-data run: ``data.test_source`` as the global test set (or no
    test set at all), no client's rows."""
    from atoll.data.sources import load_source
    from atoll.data.tasks import Tokenized, resolve_task, tokenize
    from atoll.experiment import LoadedData
    from atoll.models.registry import check_model_for_task

    check_model_for_task(config.model.name, config.data.task != "classification")
    tokenizer, cache_dir = fixed_tokenizer(config)
    if not config.data.test_source:
        empty = Tokenized(
            np.array([], dtype=np.int32), np.zeros(1, dtype=np.int64), np.array([], dtype=np.int64), np.array([], dtype=np.int32)
        )
        return LoadedData(server_task(config), tokenizer, empty, empty_splits(config, np.array([], dtype=np.int64)))
    raw = load_source(config.data.test_source)
    spec = resolve_task(config.data, raw)
    data = tokenize(spec, raw, tokenizer, config.model.max_length, cache_dir, "all")
    global_test = np.arange(len(data))
    if config.eval.max_examples is not None:
        global_test = global_test[: config.eval.max_examples]
    return LoadedData(spec, tokenizer, data, empty_splits(config, global_test))


class NodeDataFederation(Federation):
    """The server's federation when the clients' data lives on their nodes: each client's train
    and test example counts are what its node reported (:meth:`report_counts`), and algorithms
    without a global model get no global metrics (the nodes hold no global test set)."""

    def __init__(self, experiment, stages=None, side: str = "server"):
        super().__init__(experiment, stages, side)
        self.counts: dict[int, tuple[int, int]] = {}

    def report_counts(self, client_id: int, train: int, test: int) -> None:
        self.counts[client_id] = (int(train), int(test))
        self.server.context.client_sizes[client_id] = int(train)

    def test_examples(self, client_id: int) -> int:
        return self.counts.get(client_id, (0, 0))[1]

    def personal_global_evaluation(self, clients) -> dict[str, float]:
        return {}


def make_federation(experiment) -> Federation:
    """The ServerApp's federation of a built experiment (the server-side protection stages): a
    :class:`NodeDataFederation` in a node-data run."""
    if experiment.config.flower.node_data:
        return NodeDataFederation(experiment)
    return Federation(experiment, side="server")
