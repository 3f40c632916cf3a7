"""Accounting: ε equals opacus' accountant, grows with rounds, falls with noise; z from a target ε."""

from __future__ import annotations

import pytest
from opacus.accountants import RDPAccountant

from atoll.privacy.dp.accounting import PrivacyAccountant, PrivacyBudget, epsilon_after, noise_multiplier_for
from atoll.privacy.errors import PrivacyBudgetError


def test_epsilon_equals_the_accountants_for_the_same_mechanism():
    reference = RDPAccountant()
    for _ in range(100):
        reference.step(noise_multiplier=1.0, sample_rate=0.01)
    assert epsilon_after(1.0, 0.01, 100, 1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    assert epsilon_after(1.0, 0.01, 100, 1e-5) == pytest.approx(1.2141, abs=1e-3)  # environment note


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_grows_with_rounds_and_falls_with_noise(kind):
    by_rounds = [epsilon_after(1.2, 0.1, rounds, 1e-5, kind) for rounds in (1, 10, 50)]
    assert by_rounds[0] < by_rounds[1] < by_rounds[2]
    by_noise = [epsilon_after(z, 0.1, 20, 1e-5, kind) for z in (0.8, 1.2, 2.0)]
    assert by_noise[0] > by_noise[1] > by_noise[2]


def test_accountant_tracks_rounds_and_restores_from_its_history():
    accountant = PrivacyAccountant("rdp")
    assert accountant.epsilon(1e-5) == 0.0
    accountant.step(1.1, 0.2, steps=3)
    accountant.step(1.1, 0.2)
    assert accountant.rounds == 4
    assert accountant.epsilon(1e-5) == pytest.approx(epsilon_after(1.1, 0.2, 4, 1e-5))
    copy = PrivacyAccountant("rdp")
    copy.restore(accountant.state())
    assert copy.epsilon(1e-5) == accountant.epsilon(1e-5)


def test_noise_multiplier_from_target_epsilon_meets_it_tightly():
    z = noise_multiplier_for(2.0, 1e-5, 0.1, 30)
    assert epsilon_after(z, 0.1, 30, 1e-5) <= 2.0
    assert epsilon_after(z * 0.99, 0.1, 30, 1e-5) > 2.0


def test_budget_allows_rounds_until_the_next_would_exceed_it():
    budget = PrivacyBudget(epsilon=epsilon_after(1.0, 0.5, 5, 1e-5) + 1e-9, delta=1e-5)
    accountant = PrivacyAccountant()
    rounds = 0
    while budget.allows_round(accountant, 1.0, 0.5):
        accountant.step(1.0, 0.5)
        rounds += 1
    assert rounds == 5


def test_a_round_without_noise_is_refused():
    with pytest.raises(PrivacyBudgetError, match="noise multiplier"):
        PrivacyAccountant().step(0.0, 0.1)
