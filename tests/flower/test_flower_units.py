"""The Flower engine without Flower processes: message codec, reply collection with dropouts,
node discovery, config refusals, private state carried in context.state across fresh processes,
and Flower's DP wrappers and clipping mod around the algorithm."""

from __future__ import annotations

import math

import pytest
import torch

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from atoll.config import config_with
from atoll.resolve import check, resolve
from atoll.engines.flower import client as flower_client
from atoll.engines.flower import protocol
from atoll.engines.flower.codec import (
    arrays_to_tensors,
    scales_to_config,
    split_state,
    state_from_records,
    state_to_records,
    tensors_to_arrays,
)
from atoll.engines.flower.server import NodeDirectory, exchange
from atoll.engines.flower.strategy import AlgorithmStrategy, RoundPlan, SecAggStrategy, adopt_aggregate
from atoll.errors import ConfigError
from atoll.experiment import build
from atoll.fl.federation import Federation
from atoll.fl.base import average_states
from atoll.fl.state import AdapterState, LoRAFactors, example_weights
from conftest import tiny_overrides
from helpers import flower_dp_driver, flower_dp_strategy, flower_secagg_workflow, forget_flower_client_experiments

pytestmark = pytest.mark.usefixtures("flower_isolation")  # a run id for building Messages, restored after each test


def random_state(seed=0, rank=4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    lora = {
        "layer.0.query": LoRAFactors(torch.randn(rank, 8, generator=gen).to(dtype), torch.randn(6, rank, generator=gen).to(dtype), 2.0),
        "layer.0.value": LoRAFactors(torch.randn(rank, 8, generator=gen).to(dtype), torch.zeros(6, rank, dtype=dtype), 0.5),
    }
    return AdapterState(lora, {"classifier.weight": torch.randn(3, 6, generator=gen).to(dtype)}, {})


def assert_same_state(a: AdapterState, b: AdapterState):
    ta, tb = a.to_tensors(), b.to_tensors()
    assert list(ta) == list(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype, key
        assert torch.equal(ta[key], tb[key]), key


# -- codec ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_state_survives_the_records_bit_for_bit(dtype):
    state = random_state(dtype=dtype)
    state.base["layer.0.query"] = torch.randn(6, 8).to(dtype)
    arrays, config = state_to_records(state)
    assert not any(key.endswith(".s") for key in arrays), "scales must not be summed or noised with the arrays"
    assert_same_state(state_from_records(arrays, config), state)


def test_a_module_without_its_scale_is_refused():
    arrays, config = state_to_records(random_state())
    config.pop(next(iter(config)))
    with pytest.raises(Exception, match="without its LoRA scale"):
        state_from_records(arrays, config)


def test_store_entries_keep_zero_d_and_integer_tensors():
    tensors = {"lora.m.s": torch.tensor(2.0, dtype=torch.float64), "count": torch.arange(3), "empty": torch.zeros(0, 4)}
    back = arrays_to_tensors(tensors_to_arrays(tensors))
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor)


# -- reply collection and node discovery -----------------------------------------------------------


class FakeGrid:
    """push/pull/get_node_ids like Flower's Grid; ``answer(message) -> content | Exception | None``
    decides each node's behaviour (None: never answers)."""

    def __init__(self, answer, online):
        self.answer = answer
        self.online = set(online)
        self.outbox = {}
        self.pulls = 0

    def get_node_ids(self):
        return sorted(self.online)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.outbox[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        replies = []
        for message_id in message_ids:
            message = self.outbox[message_id]
            if message.metadata.dst_node_id not in self.online:
                continue
            outcome = self.answer(message)
            if outcome is None:
                continue
            from flwr.app import Error

            if isinstance(outcome, Exception):
                replies.append(Message(Error(code=0, reason=str(outcome)), reply_to=message))
            else:
                replies.append(Message(outcome, reply_to=message))
        return replies


def test_exchange_collects_replies_errors_and_gives_up_on_silent_nodes():
    def answer(message):
        node = message.metadata.dst_node_id
        return {10: RecordDict({"x": ConfigRecord({"ok": 1})}), 11: RuntimeError("boom"), 12: None}[node]

    grid = FakeGrid(answer, [10, 11, 12])
    messages = {c: Message(RecordDict(), dst_node_id=10 + c, message_type="query") for c in range(3)}
    replies, failures = exchange(grid, messages, timeout=0.3, poll=0.05)
    assert set(replies) == {0}
    assert "boom" in failures[1]
    assert "round_timeout" in failures[2]


def test_exchange_drops_a_node_that_goes_offline_without_waiting_for_the_timeout(monkeypatch):
    from atoll.engines.flower import server

    monkeypatch.setattr(server, "LIVENESS_SECONDS", 0.0)
    # node 10 answers; node 11 crashed after the message was pushed and never will: the exchange
    # must end on seeing it offline, not after the 30 s round timeout (a regression fails below)
    grid = FakeGrid(lambda message: RecordDict({"x": ConfigRecord({"ok": 1})}) if message.metadata.dst_node_id == 10 else None, [10, 11])
    grid.online.discard(11)
    messages = {
        0: Message(RecordDict(), dst_node_id=10, message_type="train"),
        1: Message(RecordDict(), dst_node_id=11, message_type="train"),
    }
    replies, failures = exchange(grid, messages, timeout=30.0, poll=0.01)
    assert set(replies) == {0}
    assert failures == {1: "its SuperNode went offline"}


def test_node_directory_maps_partitions_and_ignores_nodes_of_another_federation():
    partitions = {20: (0, 3), 21: (2, 3), 22: (1, 5), 23: (0, 3)}

    def answer(message):
        partition, count = partitions[message.metadata.dst_node_id]
        return RecordDict({protocol.INFO: ConfigRecord({"partition-id": partition, "num-partitions": count})})

    grid = FakeGrid(answer, partitions)
    directory = NodeDirectory(grid, num_clients=3, timeout=5.0)
    mapping = directory.refresh()
    assert mapping == {0: 20, 2: 21}  # 22 serves another federation; 23 duplicates partition 0
    assert "of 5" in directory.rejected[22]
    grid.online.discard(21)
    assert directory.refresh() == {0: 20}
    queried = grid.pulls
    directory.refresh()
    assert grid.pulls == queried, "known nodes are not queried again"


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"flower.secagg.enabled": "true", "algorithm.name": "flexlora"}, "cannot run under SecAgg"),
        ({"flower.dp.mode": "server-fixed", "algorithm.name": "flora"}, "cannot run under Flower's DP"),
        ({"flower.dp.mode": "client-fixed", "flower.secagg.enabled": "true"}, "cannot be combined"),
        ({"algorithm.name": "centralized"}, "pools every client"),
        ({"flower.mode": "deployment"}, "needs flower.superlink"),
        ({"flower.mode": "deployment", "flower.superlink": "10.1.2.3:9093", "flower.insecure": "true"}, "only allowed on loopback"),
        ({"flower.mode": "deployment", "flower.superlink": "superlink.example.org:9093"}, "root_certificates is not set"),
        ({"flower.mode": "deployment", "flower.superlink": "no-port"}, "is not host:port"),
        ({"flower.secagg.enabled": "true", "federation.sample_rate": 0.25}, "at least 2 clients"),
        ({"flower.min_available_clients": 9}, "exceeds federation.clients"),
        ({"flower.dp.mode": "server-adaptive", "flower.dp.noise_multiplier": 1.0}, "too large for adaptive clipping"),
        ({"flower.secagg.enabled": "true", "flower.secagg.num_shares": 2}, "num_shares must be an integer > 2"),
        ({"flower.secagg.enabled": "true", "flower.secagg.num_shares": 1.5}, "num_shares as a fraction"),
        ({"flower.secagg.enabled": "true", "flower.secagg.reconstruction_threshold": 1.5}, "reconstruction_threshold as a fraction"),
        (
            {"flower.secagg.enabled": "true", "flower.secagg.num_shares": 4, "flower.secagg.reconstruction_threshold": 4},
            "must be smaller than num_shares",
        ),
    ],
)
def test_impossible_flower_settings_are_one_line_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        check(config_with(tiny_overrides(tmp_path, **{"engine": "flower", **overrides})))
    assert "\n" not in str(error.value)


def test_mean_aggregators_are_accepted_with_secagg_and_dp(tmp_path):
    config_with(tiny_overrides(tmp_path, **{"engine": "flower", "flower.secagg.enabled": "true"}))
    config_with(tiny_overrides(tmp_path, **{"engine": "flower", "flower.dp.mode": "client-adaptive", "algorithm.name": "fedprox"}))
    config_with(
        tiny_overrides(
            tmp_path, **{"engine": "flower", "flower.mode": "deployment", "flower.superlink": "[::1]:9093", "flower.insecure": "true"}
        )
    )


def test_helpers_refuse_insecure_superlinks_off_loopback():
    from atoll.engines.flower.processes import superlink_command, supernode_command

    with pytest.raises(ConfigError, match="loopback"):
        superlink_command("0.0.0.0", 9093)
    with pytest.raises(ConfigError, match="loopback"):
        supernode_command("192.168.1.5:9093", 0, 2, 9094, insecure=True)
    assert "--insecure" in superlink_command("127.0.0.1", 9093)


def test_certs_sign_a_server_certificate_for_the_given_hosts_and_node_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from atoll.engines.flower.certs import generate

    paths = generate(tmp_path, ["superlink.example.org"], nodes=2)
    ca = x509.load_pem_x509_certificate(paths.ca.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink.example.org" in names.get_values_for_type(x509.DNSName)
    assert any(str(ip) == "127.0.0.1" for ip in names.get_values_for_type(x509.IPAddress))
    key = load_ssh_private_key(paths.node_key(1).read_bytes(), None)
    assert key.public_key().public_numbers() == load_ssh_public_key(paths.node_public_key(1).read_bytes()).public_numbers()
    assert paths.server_key.stat().st_mode & 0o077 == 0


# -- the ClientApp: private state across fresh processes ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    def make(**extra):
        config = config_with(tiny_overrides(tmp_path_factory.mktemp("runs"), **{"engine": "flower", **extra}))
        run_config = protocol.run_config_for(resolve(config))
        return config, run_config

    return make


@pytest.fixture(scope="module")
def shared_experiment(tiny_run):
    config, _ = tiny_run(**{"flower.secagg.enabled": "true"})
    experiment = build(config)
    yield experiment
    experiment.close()


@pytest.fixture
def experiment(shared_experiment):
    """One built federation shared by the strategy tests; each test starts from the initial global adapter."""
    initial = shared_experiment.server.global_state.clone()
    yield shared_experiment
    shared_experiment.server.global_state = initial


def fresh_process_context(context: Context) -> Context:
    """What a SuperNode hands the next round's fresh ClientApp process: the context after a trip
    through protobuf, and no experiment cached in the process."""
    from flwr.common.serde import context_from_proto, context_to_proto

    forget_flower_client_experiments()
    return context_from_proto(context_to_proto(context))


def train_message(experiment, round, client_id, node_id, action="", extra_config=None):
    server = experiment.server
    strategy = AlgorithmStrategy(Federation(experiment), train_action=action)
    strategy.plan = RoundPlan(round, {client_id: node_id}, {client_id: server.configure(round, client_id)})
    return strategy.configure_train(round, None, ConfigRecord(extra_config or {}), None)[0]


@pytest.mark.parametrize("algorithm", ["local-only", "fedsa-lora"])
def test_private_state_survives_rounds_on_its_node_and_matches_the_local_engine(tiny_run, algorithm):
    from atoll.engines.flower.strategy import update_from_reply

    config, run_config = tiny_run(**{"algorithm.name": algorithm})
    local = build(config)  # the local engine's view of the same federation
    try:
        contexts = {
            c: Context(
                run_id=1, node_id=100 + c, node_config={"partition-id": c, "num-partitions": 4}, state=RecordDict(), run_config=run_config
            )
            for c in (0, 1)
        }
        for round in (1, 2):  # private state made in round 1 must be what round 2 starts from
            for client_id in (0, 1):  # one process serves both clients in turn, as a Ray actor may
                message = train_message(local, round, client_id, 100 + client_id)
                reply = flower_client.handle_train(message, contexts[client_id])
                remote = update_from_reply(reply.content, client_id)
                expected = local.clients[client_id].run(round, local.server.configure(round, client_id))
                assert remote.metrics == expected.metrics, (algorithm, round, client_id)
                assert_same_state(remote.state, expected.state)
                assert any(k.startswith(flower_client.STORE_PREFIX) for k in contexts[client_id].state.array_records)
                contexts[client_id] = fresh_process_context(contexts[client_id])
            local.server.aggregate(round, [])  # downloads stay the initial ones: only private state moves
    finally:
        local.close()


def test_a_node_refuses_work_meant_for_another_partition(tiny_run):
    config, run_config = tiny_run()
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2, "num-partitions": 4}, state=RecordDict(), run_config=run_config)
    experiment = flower_client.federation_for(context).experiment
    with pytest.raises(ConfigError, match="serves client 2"):
        flower_client.handle_train(train_message(experiment, 1, 1, 7), context)
    wrong = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 9}, state=RecordDict(), run_config=run_config)
    with pytest.raises(ConfigError, match="of 9"):
        flower_client.handle_train(train_message(experiment, 1, 0, 7), wrong)


# -- DP: Flower's wrappers and mods around the algorithm ------------------------------------------------------


def reply_with(message, state, client_id, examples):
    tensors, scales = split_state(state)
    content = RecordDict(
        {
            "arrays": tensors_to_arrays(tensors),
            "metrics": MetricRecord({"client-id": client_id, "num-examples": examples, "loss": 1.0}),
            "config": ConfigRecord(scales_to_config(scales)),
        }
    )
    return Message(content, reply_to=message)


def flat(state):
    tensors, _ = split_state(state)
    return torch.cat([t.float().flatten() for t in tensors.values()])


@pytest.mark.parametrize("weighting", ["equal", "examples"])
def test_server_side_fixed_clipping_clips_each_update_before_the_algorithm_averages(experiment, weighting):
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    server = experiment.server
    start = server.global_state.clone()
    inner = AlgorithmStrategy(Federation(experiment), uniform_download=True, equal_weights=weighting == "equal")
    clip = 0.5
    strategy = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=0.0, clipping_norm=clip, num_sampled_clients=2)
    inner.plan = RoundPlan(1, {0: 10, 1: 11}, {0: server.configure(1, 0), 1: server.configure(1, 1)})
    tensors, _ = split_state(server.global_state)
    messages = list(strategy.configure_train(1, tensors_to_arrays(tensors), ConfigRecord(), None))
    uploads = {0: start.map_tensors(lambda t: t + 3.0), 1: start.map_tensors(lambda t: t + 0.001)}
    replies = [reply_with(m, uploads[c], c, n) for m, (c, n) in zip(messages, [(0, 30), (1, 10)], strict=True)]
    arrays, _ = strategy.aggregate_train(1, replies)
    adopt_aggregate(server, arrays)

    def clipped(state):
        delta = flat(state) - flat(start)
        return delta * min(1.0, clip / float(delta.norm()))

    # equal: 1/m each, so one client moves the mean by at most C/m (the noise's calibration);
    # examples (30 vs 10): the big client moves it by up to 0.75 C
    p0 = 0.5 if weighting == "equal" else 0.75
    expected = p0 * clipped(uploads[0]) + (1 - p0) * clipped(uploads[1])
    assert torch.allclose(flat(server.global_state) - flat(start), expected, atol=1e-6)
    assert float((flat(server.global_state) - flat(start)).norm()) <= clip + 1e-6
    scales = {n: f.scale for n, f in server.global_state.lora.items()}
    assert scales == {n: f.scale for n, f in start.lora.items()}


def test_server_side_noise_has_the_calibrated_spread(experiment):
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    server = experiment.server
    start = server.global_state.clone()
    inner = AlgorithmStrategy(Federation(experiment), uniform_download=True)
    strategy = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=2.0, clipping_norm=0.1, num_sampled_clients=4)
    inner.plan = RoundPlan(1, {c: 10 + c for c in range(4)}, {c: server.configure(1, c) for c in range(4)})
    tensors, _ = split_state(server.global_state)
    messages = list(strategy.configure_train(1, tensors_to_arrays(tensors), ConfigRecord(), None))
    # a tiny update (Flower's clipping divides by the update norm: an exactly-zero update crashes it)
    replies = [reply_with(m, start.map_tensors(lambda t: t + 1e-6), c, 10) for c, m in enumerate(messages)]
    arrays, _ = strategy.aggregate_train(1, replies)
    adopt_aggregate(server, arrays)
    noise = flat(server.global_state) - flat(start)
    assert noise.numel() > 1000
    assert float(noise.std()) == pytest.approx(2.0 * 0.1 / 4, rel=0.1)


def test_dp_refuses_client_specific_downloads(experiment):
    from atoll.errors import AlgorithmError

    server = experiment.server
    strategy = AlgorithmStrategy(Federation(experiment), uniform_download=True)
    odd = server.global_state.map_tensors(lambda t: t + 1.0)
    strategy.plan = RoundPlan(1, {0: 10}, {0: odd})
    with pytest.raises(AlgorithmError, match="differs from the global adapter"):
        strategy.configure_train(1, None, ConfigRecord(), None)


def test_client_side_clipping_mod_bounds_what_leaves_the_node(tiny_run):
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from atoll.engines.flower.app import client_app
    from atoll.engines.flower.strategy import update_from_reply

    config, run_config = tiny_run(**{"train.lr": 0.05})
    context = Context(run_id=1, node_id=13, node_config={"partition-id": 3, "num-partitions": 4}, state=RecordDict(), run_config=run_config)
    experiment = flower_client.federation_for(context).experiment
    server = experiment.server
    clip = 1e-3
    message = train_message(experiment, 1, 3, 13, action=protocol.ACTION_CLIP_FIXED, extra_config={KEY_CLIPPING_NORM: clip})
    message.metadata.__dict__["_message_id"] = message.object_id
    reply = client_app(message, context)
    assert not reply.has_error(), reply.error if reply.has_error() else ""
    upload = update_from_reply(reply.content, 3)
    delta = flat(upload.state) - flat(server.configure(1, 3))
    assert float(delta.norm()) == pytest.approx(clip, rel=1e-3)  # trained far beyond it, clipped to it


# -- SecAgg+: the algorithm sees only the mean ----------------------------------------------------------------


def test_secagg_strategy_hands_the_unmasked_mean_to_the_algorithm_as_one_update(experiment):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from atoll.engines.flower.codec import state_to_legacy

    server = experiment.server
    states = [server.global_state.map_tensors(lambda t, k=k: t + 0.1 * k) for k in range(3)]
    sizes = [5, 10, 25]
    weights = example_weights([type("U", (), {"num_examples": n})() for n in sizes])
    mean = average_states(states, weights, base=server.global_state)
    strategy = SecAggStrategy(Federation(experiment))
    strategy.plan = RoundPlan(1, {c: 10 + c for c in range(3)}, {c: server.configure(1, c) for c in range(3)})
    arrays, description = state_to_legacy(mean)
    results = [
        (
            None,
            FitRes(
                Status(Code.OK, ""),
                ndarrays_to_parameters(arrays),
                n,
                {"client-id": c, "num-examples": n, "loss": 0.5, "atoll.meta": description},
            ),
        )
        for c, n in enumerate(sizes)
    ]
    strategy.aggregate_fit(1, results, [])
    assert strategy.aggregated
    assert_same_state(server.global_state, mean)
    assert [u.client_id for u in strategy.plan.updates] == [0, 1, 2]
    assert math.isclose(sum(u.metrics["loss"] for u in strategy.plan.updates), 1.5)


def test_adaptive_clipping_moves_its_bound_by_the_configured_rate_toward_the_configured_quantile(tiny_run):
    """Andrew et al., "Differentially Private Learning with Adaptive Clipping" (NeurIPS 2021): after
    a round the bound C becomes C * exp(-lr * (b - q)), b the fraction of updates within C, q
    flower.dp.target_clipped_quantile, lr flower.dp.clip_norm_lr. Built from the config as the
    ServerApp builds it, no noise: one update far beyond C = 0.5, one within it, so b = 1/2."""
    settings = {"flower.dp.mode": "server-adaptive", "flower.dp.clipping_norm": 0.5, "flower.dp.noise_multiplier": 0.0}
    settings.update({"flower.dp.target_clipped_quantile": 0.2, "flower.dp.clip_norm_lr": 0.3, "federation.sample_rate": 0.5})
    config, _ = tiny_run(**settings)
    experiment = build(config)
    try:
        strategy, inner = flower_dp_strategy(experiment)
        assert strategy.clipping_norm == 0.5
        server = experiment.server
        start = server.global_state.clone()
        inner.plan = RoundPlan(1, {0: 10, 1: 11}, {0: server.configure(1, 0), 1: server.configure(1, 1)})
        tensors, _ = split_state(start)
        messages = list(strategy.configure_train(1, tensors_to_arrays(tensors), ConfigRecord(), None))
        uploads = {0: start.map_tensors(lambda t: t + 3.0), 1: start.map_tensors(lambda t: t + 1e-4)}
        strategy.aggregate_train(1, [reply_with(m, uploads[c], c, 10) for m, c in zip(messages, (0, 1), strict=True)])
        assert strategy.clipping_norm == pytest.approx(0.5 * math.exp(-0.3 * (0.5 - 0.2)), rel=1e-9)
    finally:
        experiment.close()


def test_flowers_dp_wrappers_report_the_accountants_epsilon_each_round(tiny_run):
    """ε after each round of Flower's central DP equals opacus' RDP accountant for the same (z, q,
    rounds, δ): q = sampled / clients, the adaptive wrappers keep the configured z; no noise, no ε."""
    from atoll.privacy.dp.accounting import epsilon_after

    # Flower's adaptive wrappers need z < 2 * clipped_count_stddev (sampled / 20 by default): a small z there
    for mode, z in (("server-fixed", 1.3), ("client-adaptive", 0.15)):
        settings = {"flower.dp.mode": mode, "flower.dp.noise_multiplier": z, "flower.dp.delta": 1e-4, "federation.sample_rate": 0.5}
        config, _ = tiny_run(**settings)
        experiment = build(config)
        try:
            driver = flower_dp_driver(experiment)
            q = driver.expected_sampled() / config.federation.clients
            assert 0 < q < 1
            got = [driver.account_dp_round() for _ in range(3)]
            want = [epsilon_after(z, q, rounds, 1e-4) for rounds in (1, 2, 3)]
            assert [g["dp_epsilon"] for g in got] == pytest.approx(want, rel=1e-12) and all(g["dp_delta"] == 1e-4 for g in got)
            assert want[0] < want[1] < want[2] and epsilon_after(2 * z, q, 3, 1e-4) < want[2]
        finally:
            experiment.close()
    config, _ = tiny_run(**{"flower.dp.mode": "server-fixed", "flower.dp.noise_multiplier": 0.0})
    experiment = build(config)
    try:
        assert flower_dp_driver(experiment).account_dp_round() == {}
    finally:
        experiment.close()


def test_secagg_settings_reach_flowers_workflow(tiny_run):
    settings = {"flower.secagg.enabled": "true", "flower.secagg.num_shares": 3, "flower.secagg.reconstruction_threshold": 2}
    settings.update({"flower.secagg.clipping_range": 4.0, "flower.secagg.quantization_range": 1024})
    config, _ = tiny_run(**settings)
    workflow = flower_secagg_workflow(config)
    assert (workflow.num_shares, workflow.reconstruction_threshold) == (3, 2)
    assert (workflow.clipping_range, workflow.quantization_range) == (4.0, 1024)
