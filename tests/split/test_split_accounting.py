"""DP accounting of the split defenses: ε composed over every release, checked against values
computed by hand, and the noise the DP defenses add is the noise their ε says."""

from __future__ import annotations

import math

import pytest
import torch

from atoll.split.defenses import accounting
from atoll.split.runner import connect
from atoll.split.setup import prepare


def test_laplace_composition_by_hand():
    # three releases of 0.5-DP: basic composition, 1.5 (advanced would give 0.5*sqrt(6 ln 1e5) + 1.5*(e^0.5 - 1) = 5.13)
    assert accounting.laplace_composed(0.5, 3, 1e-5) == (1.5, 0.0)
    # a thousand releases of 0.01-DP: 0.01*sqrt(2000 ln 1e5) + 1000*0.01*(e^0.01 - 1) = 1.51743 + 0.10050 = 1.61793, with delta' = 1e-5
    epsilon, delta = accounting.laplace_composed(0.01, 1000, 1e-5)
    assert epsilon == pytest.approx(1.61793, abs=1e-4) and delta == 1e-5
    assert accounting.laplace_scale(0.5, 2 * 0.2) == pytest.approx(0.8)


def test_gaussian_composition_by_hand():
    # four releases of 1-GDP are exactly 2-GDP; from normal tables, Phi(-4) = 3.1671e-5 and Phi(-6) = 9.8659e-10, so
    # delta(epsilon = 10) = Phi(-10/2 + 1) - e^10 * Phi(-10/2 - 1) = 3.1671e-5 - 22026.47 * 9.8659e-10 = 9.9401e-6
    delta = accounting.gdp_delta(2.0, 10.0)
    assert delta == pytest.approx(3.1671e-5 - math.exp(10) * 9.8659e-10, rel=1e-3)
    assert accounting.gaussian_composed(1.0, 4, delta) == pytest.approx(10.0, abs=1e-6)
    # one release of mu-GDP at epsilon 0: delta = Phi(mu/2) - Phi(-mu/2), 0.38292 for mu = 1 (= erf(0.5 / sqrt 2))
    assert accounting.gdp_delta(1.0, 0.0) == pytest.approx(0.38292, abs=1e-5)
    # per-release (epsilon, delta) -> mu is the inverse of the same curve
    mu = accounting.gdp_mu(1.0, 1e-5)
    assert accounting.gdp_delta(mu, 1.0) == pytest.approx(1e-5, rel=1e-6)
    assert accounting.gdp_epsilon(mu, 1e-5) == pytest.approx(1.0, abs=1e-6)


def test_dp_defenses_report_epsilon_composed_over_every_release(split_config):
    """Laplace on gradients, 0.5 per release, 3 training steps: 1.5. Gaussian on activations,
    (1, 1e-5) per release, 3 training steps + 1 evaluation batch = 4 releases of mu = 0.26805 each:
    2 * 0.26805-GDP, epsilon 2.1547 at delta 1e-5 (not 4 * 1)."""
    defenses = "[{name: laplace-dp, position: gradients, epsilon: 0.5, clip: 0.2}, {name: gaussian-dp, epsilon: 1.0, clip: 5}]"
    setup = prepare(split_config(**{"defenses": defenses}))
    session = connect(setup, None)
    party = session.parties[0]
    for _ in range(2):
        party.train_step()
    party.infer(setup.data.collate(setup.test_indices[:8]))
    party.train_step()
    report = party.defenses.report()
    assert report["laplace-dp.releases"] == 3 and report["laplace-dp.epsilon"] == pytest.approx(1.5)
    assert report["gaussian-dp.releases"] == 4
    assert accounting.gdp_mu(1.0, 1e-5) == pytest.approx(0.268051, abs=1e-6)
    assert report["gaussian-dp.epsilon"] == pytest.approx(accounting.gdp_epsilon(2 * 0.2680511, 1e-5), rel=1e-6)
    assert report["gaussian-dp.epsilon"] == pytest.approx(2.1547, abs=1e-4)
    session.abort()


def test_dp_noise_is_calibrated_to_epsilon_and_every_example_is_clipped(split_config):
    """What the model party receives minus the clipped clean activations is Laplace(0, 2C/epsilon)
    (mean |x| = b) or Gaussian(0, sigma = 2C/mu); each example is clipped to norm C (padding zeroed)."""
    from atoll.split.defenses.dp import clip_per_example

    from .test_split_privacy import _clean_head_output

    for spec, order in (("{name: laplace-dp, epsilon: 200, clip: 50}", 1), ("{name: gaussian-dp, epsilon: 2000, clip: 5}", 2)):
        setup = prepare(split_config(**{"defenses": f"[{spec}]", "record.every": 1}))
        session = connect(setup, None)
        party = session.parties[0]
        party.train_step()
        batch = setup.data.collate(party.batch_log[1])
        mask = batch["attention_mask"]
        clipped = clip_per_example(_clean_head_output(setup, batch), mask, 50 if order == 1 else 5, order)
        norms = clipped.flatten(1).norm(p=order, dim=1)
        assert torch.all(norms <= (50 if order == 1 else 5) * (1 + 1e-5))
        noise = (session.model_party.transcript.of_kind("forward")[0].tensors["activations"] - clipped)[mask.bool()]
        defense = party.defenses.defenses[0]
        if order == 1:
            assert noise.abs().mean().item() == pytest.approx(defense.scale, rel=0.05)
            assert defense.scale == pytest.approx(2 * 50 / 200)
        else:
            assert noise.std().item() == pytest.approx(defense.sigma, rel=0.05)
            assert defense.sigma == pytest.approx(2 * 5 / accounting.gdp_mu(2000, 1e-5))
        session.abort()
