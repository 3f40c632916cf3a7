"""SCAFFOLD: gradient correction g + c - c_i on the live adapter, the option-I (default) and
option-II variate updates,
the server steps (x by eta_g * weighted mean of y_k - x, c by 1/N * sum dc), c = mean of all c_i
over a real run, round 1 = FedIT, and resume."""

import itertools

import pytest
import torch

from atoll.algorithms.scaffold import CONTROL, CONTROL_DELTA, control_of, variate_tensors, with_control
from atoll.config import config_with
from atoll.resolve import check
from atoll.errors import ConfigError
from atoll.experiment import build
from atoll.fl.store import ClientStore
from atoll.report.progress import Progress
from atoll.dispatch import resume_run
from conftest import tiny_overrides
from optsvd_helpers import (  # noqa: F401 (no_plots is an autouse fixture)
    no_plots,
    MODULES,
    SIZES,
    StopAfter,
    assert_finite_run,
    last_checkpoint,
    make_client,
    make_server,
    random_state,
    run,
    task_metrics,
    updates_for,
)


def random_like(tensors, seed):
    gen = torch.Generator().manual_seed(seed)
    return {key: torch.randn(t.shape, generator=gen) for key, t in tensors.items()}


def test_correction_is_added_to_the_accumulated_gradient_of_every_trained_tensor(tmp_path):
    experiment = build(config_with(tiny_overrides(tmp_path, **{"algorithm.name": "scaffold"})))
    try:
        server, client = experiment.server, experiment.clients[1]
        server.control = random_like(server.control, 0)
        own = random_like(server.control, 1)
        experiment.store.put(1, own)
        download = server.configure(1, 1)
        live = experiment.workbench.load(download)
        after_backward = client.hooks(1, download).after_backward
        handles = {f"lora.{n}.A": a for n, (a, b, _) in live.lora.items()}
        handles.update({f"lora.{n}.B": b for n, (a, b, _) in live.lora.items()})
        handles.update({f"extra.{n}": p for n, p in live.extra.items()})
        assert set(handles) == set(server.control)
        gradients = random_like(server.control, 2)
        for key, param in handles.items():
            param.grad = gradients[key].clone()
        some_key = sorted(handles)[0]
        handles[some_key].grad = None  # a tensor without gradient still gets the correction
        after_backward()
        for key, param in handles.items():
            g = 0.0 if key == some_key else gradients[key]
            assert torch.allclose(param.grad, g + server.control[key] - own[key], atol=1e-6), key
    finally:
        for param in experiment.workbench.active.all_parameters():
            param.grad = None
        experiment.close()


def option_ii_setup(seed, store, overrides=()):
    client = make_client("scaffold", client_id=2, store=store, overrides=list(overrides), control_update="option-ii")
    x = random_state(seed)
    y = random_state(seed + 1)
    c = random_like(variate_tensors(x), seed + 2)
    start = with_control(x, CONTROL, c)
    return client, x, y, c, start


def test_option_ii_variate_update_and_upload():
    store = ClientStore()
    client, x, y, c, start = option_ii_setup(10, store, ["train.local_steps=7", "train.lr=0.01"])
    c_i = random_like(c, 20)
    store.put(2, c_i)
    client.keep(1, start, y)
    upload = client.upload(1, start, y)
    xs, ys = variate_tensors(x), variate_tensors(y)
    expected = {k: c_i[k] - c[k] + (xs[k] - ys[k]) / (7 * 0.01) for k in c}
    stored = store.get(2)
    sent = control_of(upload, CONTROL_DELTA)
    assert set(stored) == set(c) == set(sent)
    for key in c:
        assert torch.allclose(stored[key], expected[key], atol=1e-4)
        assert torch.allclose(sent[key], expected[key] - c_i[key], atol=1e-4)
    # y travels as the adapter itself (the server forms y - x); the variate change rides along
    assert torch.equal(upload.lora["q"].B, y.lora["q"].B)
    assert upload.nbytes() > y.nbytes()


def test_option_ii_divides_by_the_sum_of_scheduled_step_sizes():
    store = ClientStore()
    client, x, y, c, start = option_ii_setup(30, store, ["train.local_steps=4", "train.lr=0.02", "train.schedule=linear"])
    client.keep(1, start, y)  # a fresh client: c_i = 0
    steps = 0.02 * (1 + 0.75 + 0.5 + 0.25)
    xs, ys = variate_tensors(x), variate_tensors(y)
    for key, value in store.get(2).items():
        assert torch.allclose(value, -c[key] + (xs[key] - ys[key]) / steps, atol=1e-4)


def server_round(server, states, deltas, ids):
    ups = updates_for([with_control(s, CONTROL_DELTA, d) for s, d in zip(states, deltas, strict=True)], [SIZES[i] for i in ids], ids=ids)
    server.aggregate(1, ups)


def test_server_steps_with_unequal_weights_partial_participation_and_any_order():
    x = random_state(40)
    states = [random_state(41 + i) for i in range(3)]
    deltas = [random_like(variate_tensors(x), 50 + i) for i in range(3)]
    ids = [0, 1, 3]
    sizes = [SIZES[i] for i in ids]
    weights = [n / sum(sizes) for n in sizes]
    results = []
    for order in itertools.permutations(range(3)):
        server = make_server("scaffold", initial=x, server_lr=0.5)
        server.control = random_like(server.control, 60)
        start_c = {k: v.clone() for k, v in server.control.items()}
        server_round(server, [states[i] for i in order], [deltas[i] for i in order], [ids[i] for i in order])
        results.append(server)
    xs = variate_tensors(x)
    for server in results:
        new = variate_tensors(server.global_state)
        for key in xs:
            step = sum(w * (variate_tensors(s)[key] - xs[key]) for w, s in zip(weights, states, strict=True))
            assert torch.allclose(new[key], xs[key] + 0.5 * step, atol=1e-5)
            # c moves by (1/N) sum dc = (|S|/N) * mean dc, N = 4 clients, |S| = 3
            assert torch.allclose(server.control[key], start_c[key] + sum(d[key] for d in deltas) / 4, atol=1e-6)
        assert server.global_state.lora["q"].scale == x.lora["q"].scale


def test_identical_inputs_with_unit_server_step_give_that_input_back():
    x = random_state(70)
    y = random_state(71)
    server = make_server("scaffold", initial=x)
    zero = {k: torch.zeros_like(v) for k, v in server.control.items()}
    server_round(server, [y.clone() for _ in range(4)], [zero] * 4, [0, 1, 2, 3])
    for name in MODULES:
        assert torch.allclose(server.global_state.lora[name].A, y.lora[name].A, atol=1e-6)
        assert torch.allclose(server.global_state.lora[name].B, y.lora[name].B, atol=1e-6)
    assert all(torch.equal(c, torch.zeros_like(c)) for c in server.control.values())


def test_mixed_ranks_are_refused():
    with pytest.raises(ConfigError, match="cannot aggregate different LoRA ranks"):
        check(config_with(["algorithm.name=scaffold", "model.lora.client_ranks={0: 4}"]))


def test_round_one_is_fedit_then_the_variates_act(tmp_path):
    fedit, _ = run(tmp_path / "fedit", "fedit")
    scaffold, summary = run(tmp_path / "scaffold", "scaffold")
    a, b = task_metrics(fedit), task_metrics(scaffold)
    assert a[0]["global"] == b[0]["global"] and a[1]["global"] == b[1]["global"]  # c = c_i = 0 in round 1
    assert a[2]["global"] != b[2]["global"]
    assert a[1]["bytes_down"] < b[1]["bytes_down"] and a[1]["bytes_up"] < b[1]["bytes_up"]  # c and dc are paid for
    assert_finite_run(scaffold, summary)


def test_server_variate_is_the_mean_of_all_client_variates_and_resume_is_exact(tmp_path):
    extra = {"federation.rounds": 3, "federation.sample_rate": 0.5}
    full, summary = run(tmp_path / "full", "scaffold", **extra)
    assert_finite_run(full, summary)
    tensors, clients = last_checkpoint(full)
    assert 0 < len(clients) <= 4
    control = {k[len(CONTROL) :]: v for k, v in tensors.items() if k.startswith(CONTROL)}
    assert control and any(float(v.abs().max()) > 0 for v in control.values())
    for key, c in control.items():
        mean = sum(stored[key] for stored in clients.values()) / 4  # never-sampled clients hold c_i = 0
        assert torch.allclose(c, mean, atol=1e-6)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", "scaffold", progress=StopAfter(2), **extra)
    cut = next((tmp_path / "cut").iterdir())
    resume_run(cut, Progress())
    assert task_metrics(cut) == task_metrics(full)


def test_option_ii_runs(tmp_path):
    path, summary = run(tmp_path, "scaffold", **{"algorithm.control_update": "option-ii"})
    assert_finite_run(path, summary)


def test_option_i_keeps_the_raw_gradient_of_the_first_local_step(tmp_path):
    """The default: c_i+ = g_i(x), the gradient of the first step as the backward pass left it,
    before the correction c - c_i is added, and not any later step's."""
    experiment = build(config_with(tiny_overrides(tmp_path, **{"algorithm.name": "scaffold"})))
    try:
        server, client = experiment.server, experiment.clients[1]
        assert client.params.control_update == "option-i"
        server.control = random_like(server.control, 0)
        own = random_like(server.control, 1)
        experiment.store.put(1, own)
        download = server.configure(1, 1)
        live = experiment.workbench.load(download)
        after_backward = client.hooks(1, download).after_backward
        handles = {f"lora.{n}.A": a for n, (a, b, _) in live.lora.items()}
        handles.update({f"lora.{n}.B": b for n, (a, b, _) in live.lora.items()})
        handles.update({f"extra.{n}": p for n, p in live.extra.items()})
        first, second = random_like(server.control, 2), random_like(server.control, 3)
        for gradients in (first, second):  # two local steps
            for key, param in handles.items():
                param.grad = gradients[key].clone()
            after_backward()
        trained = experiment.workbench.active.read()
        client.keep(1, download, trained)
        stored, sent = experiment.store.get(1), control_of(client.upload(1, download, trained), CONTROL_DELTA)
        assert set(stored) == set(first) == set(sent)
        for key in first:
            assert torch.equal(stored[key], first[key]), key
            assert torch.allclose(sent[key], first[key] - own[key], atol=1e-6), key
    finally:
        for param in experiment.workbench.active.all_parameters():
            param.grad = None
        experiment.close()


def test_client_variates_never_leak_between_clients_sharing_a_store():
    store = ClientStore()
    first, x, y, c, start = option_ii_setup(80, store)
    second = make_client("scaffold", client_id=3, store=store, control_update="option-ii")
    first.keep(1, start, y)
    kept = {k: v.clone() for k, v in store.get(2).items()}
    assert all(float(v.abs().max()) == 0.0 for v in second.own_variate(kept).values())  # 3 never trained
    second.keep(1, start, random_state(90))
    assert all(torch.equal(store.get(2)[k], kept[k]) for k in kept)
    assert not torch.equal(store.get(3)[sorted(kept)[0]], kept[sorted(kept)[0]])
