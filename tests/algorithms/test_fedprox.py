"""FedProx: the proximal gradient is mu * (w - w_global) on the live adapter, mu = 0 is FedIT bit
for bit, and the server is FedIT's weighted average."""

import itertools

import pytest
import torch
from torch import nn

from atoll.algorithms.fedprox import proximal_loss
from atoll.config import config_with
from atoll.resolve import check
from atoll.errors import ConfigError
from atoll.experiment import build
from conftest import tiny_overrides
from optsvd_helpers import no_plots  # noqa: F401 (autouse fixture)
from optsvd_helpers import SIZES, MODULES, assert_finite_run, make_server, random_state, run, task_metrics, updates_for, weights_of


def test_proximal_gradient_is_mu_times_distance_on_random_tensors():
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 5, generator=gen)), nn.Parameter(torch.randn(7, generator=gen))]
    anchors = [torch.randn(3, 5, generator=gen), torch.randn(7, generator=gen)]
    loss = proximal_loss(list(zip(params, anchors, strict=True)), mu=0.3)
    expected = 0.15 * sum(((p.detach() - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
    assert torch.allclose(loss, expected)
    loss.backward()
    for p, a in zip(params, anchors, strict=True):
        assert torch.allclose(p.grad, 0.3 * (p.detach() - a), atol=1e-6)


def test_hook_on_the_live_adapter_pulls_every_trained_tensor_toward_the_download(tmp_path):
    experiment = build(config_with(tiny_overrides(tmp_path, **{"algorithm.name": "fedprox", "algorithm.mu": 0.5})))
    try:
        client = experiment.clients[0]
        download = experiment.server.configure(1, 0)
        live = experiment.workbench.load(download)
        hooks = client.hooks(1, download)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in live.all_parameters():
                param.add_(torch.randn(param.shape, generator=gen))
        for param in live.all_parameters():
            param.grad = None
        hooks.extra_loss().backward()
        checked = 0
        for name, (a, b, _) in live.lora.items():
            assert torch.allclose(a.grad, 0.5 * (a.detach() - download.lora[name].A), atol=1e-5)
            assert torch.allclose(b.grad, 0.5 * (b.detach() - download.lora[name].B), atol=1e-5)
            checked += 2
        for name, param in live.extra.items():
            assert torch.allclose(param.grad, 0.5 * (param.detach() - download.extra[name]), atol=1e-5)
            checked += 1
        assert checked == 2 * len(live.lora) + len(live.extra) and live.extra  # the head is included
    finally:
        for param in experiment.workbench.active.all_parameters():
            param.grad = None
        experiment.close()


def test_server_is_the_weighted_average_and_order_free():
    states = [random_state(i) for i in range(4)]
    results = []
    for order in itertools.permutations(range(4)):
        server = make_server("fedprox")
        server.aggregate(1, updates_for([states[i] for i in order], [SIZES[i] for i in order], ids=list(order)))
        results.append(server.global_state)
    weights = weights_of()
    for name in MODULES:
        expected_B = sum(w * s.lora[name].B for w, s in zip(weights, states, strict=True))
        for result in results:
            assert torch.allclose(result.lora[name].B, expected_B, atol=1e-6)
    same = make_server("fedprox")
    same.aggregate(1, updates_for([states[2].clone() for _ in range(4)]))
    assert torch.allclose(same.global_state.lora["q"].A, states[2].lora["q"].A, atol=1e-6)


def test_mixed_ranks_are_refused():
    with pytest.raises(ConfigError, match="cannot aggregate different LoRA ranks"):
        check(config_with(["algorithm.name=fedprox", "model.lora.client_ranks={0: 4}"]))


def test_mu_zero_is_fedit_bit_for_bit_and_mu_matters(tmp_path):
    fedit_path, _ = run(tmp_path / "fedit", "fedit")
    zero_path, summary = run(tmp_path / "zero", "fedprox", **{"algorithm.mu": 0.0})
    strong_path, strong = run(tmp_path / "strong", "fedprox", **{"algorithm.mu": 50.0})
    assert task_metrics(zero_path) == task_metrics(fedit_path)
    assert task_metrics(strong_path) != task_metrics(fedit_path)
    assert_finite_run(strong_path, strong)
    assert_finite_run(zero_path, summary)
