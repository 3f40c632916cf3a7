"""Protections and attacks from a run config, through real runs of the tiny BERT federation on the
synchronous loop and the realistic event simulation: what each writes to metrics.jsonl and
summary.json, and that the protected result is what the mechanism says it is."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atoll.config import config_with
from atoll.dispatch import start_run
from atoll.errors import ConfigError
from atoll.report.progress import Progress
from atoll.resolve import check
from conftest import tiny_overrides

# 2 rounds of 1 local step: the runs check the wiring, not learning
QUICK = {"federation.rounds": 2, "train.local_steps": 1, "eval.local": "never", "eval.initial": "false"}


def run(root: Path, **settings) -> tuple[Path, list[dict], dict]:
    """A run of the tiny federation with ``settings``: its directory, round records and summary."""
    run_dir, summary = start_run(config_with(tiny_overrides(root, **{**QUICK, **settings})), Progress())
    records = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()]
    return run_dir.path, [r for r in records if r["round"] > 0], summary


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> tuple[Path, list[dict], dict]:
    """The unprotected run every protected one is compared with (1 round)."""
    return run(tmp_path_factory.mktemp("plain"), **{"federation.rounds": 1})


def opacus_epsilon(noise: float, rate: float, rounds: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise, rate, rounds)]
    return accountant.get_epsilon(delta=delta)


def test_dp_fedavg_records_the_accountants_epsilon_every_round_and_stops_at_the_budget(tmp_path):
    """2 of 4 clients per round (q = 0.5), z = 1.2: the record's ε is opacus' for (q, z, rounds, δ);
    a budget between round 2's ε and round 3's stops the 4-round run after round 2."""
    expected = {r: opacus_epsilon(1.2, 0.5, r, 1e-5) for r in (1, 2, 3)}
    budget = (expected[2] + expected[3]) / 2
    settings = {
        "federation.rounds": 4,
        "federation.sample_rate": 0.5,
        "privacy.dp.mode": "fixed",
        "privacy.dp.noise_multiplier": 1.2,
        "privacy.dp.clip_norm": 1e-4,  # every update is clipped
        "privacy.dp.budget_epsilon": budget,
        "eval.every": 10,
    }
    _, records, summary = run(tmp_path, **settings)
    assert [r["round"] for r in records] == [1, 2]
    assert "global" not in records[0] and "accuracy" in records[1]["global"]  # the model the stop leaves is evaluated
    for record in records:
        protection = record["protection"]
        assert protection["dp_epsilon"] == pytest.approx(expected[record["round"]], rel=1e-9)
        assert protection["dp_clipped"] == 2.0 and protection["dp_noise_multiplier"] == 1.2
    assert records[0]["protection"]["dp_epsilon"] < records[1]["protection"]["dp_epsilon"]
    assert summary["protection"]["dp_epsilon"] == pytest.approx(expected[2], rel=1e-9)
    assert "privacy budget" in summary["stopped_early"]


def test_a_resumed_dp_run_keeps_its_privacy_accounts(tmp_path):
    """Adaptive DP-FedAvg, killed after round 1 and resumed: the accountant's history and the
    adapted bound come back from the checkpoint, so ε, the bound and the adapter are the
    uninterrupted run's (not ε of the 2 rounds the resumed process ran)."""
    from helpers import killed_copy, resume

    settings = {
        "federation.rounds": 3,
        "privacy.dp.mode": "adaptive",
        "privacy.dp.clip_norm": 0.01,
        "privacy.dp.count_noise_stddev": 1.0,
    }
    full_dir, _, full = run(tmp_path / "full", **settings)
    resumed = resume(killed_copy(full_dir, 1, tmp_path / "killed"))
    assert resumed["protection"]["dp_epsilon"] == pytest.approx(full["protection"]["dp_epsilon"], rel=1e-12)
    assert resumed["protection"]["dp_epsilon"] == pytest.approx(opacus_epsilon(1.0, 1.0, 3, 1e-5), rel=1e-9)
    assert resumed["protection"]["dp_clip_norm"] == pytest.approx(full["protection"]["dp_clip_norm"], rel=1e-12)
    assert full["protection"]["dp_clip_norm"] != 0.01  # the bound moved (all 4 updates were clipped)
    expected, found = adapter(full_dir), adapter(tmp_path / "killed")
    assert all(torch.allclose(expected[k], found[k], atol=1e-7) for k in expected)


def test_a_sign_flipping_client_uploads_the_scaled_opposite_of_its_honest_change(tmp_path):
    """The attacker trains honestly from its download, then uploads download − 3 × its change."""
    from atoll.experiment import build
    from atoll.fl.federation import Federation
    from atoll.privacy.messages import flat_delta

    settings = {**QUICK, "attack.kind": "sign-flip", "attack.clients": "[1]", "attack.byzantine.scale": 3}
    experiment = build(config_with(tiny_overrides(tmp_path, **settings)))
    try:
        federation = Federation(experiment)
        download = federation.configure(1, 1)
        attacked = flat_delta(federation.train(1, 1, download).state, download, 1)[0]
        honest = flat_delta(experiment.clients[1].run(1, download).state, download, 1)[0]
        assert honest.norm() > 0
        assert torch.allclose(attacked, -3.0 * honest, atol=1e-6)
        other = flat_delta(federation.train(1, 0, federation.configure(1, 0)).state, download, 0)[0]
        assert torch.allclose(other, flat_delta(experiment.clients[0].run(1, download).state, download, 0)[0])
    finally:
        experiment.close()


@pytest.mark.parametrize(
    "algorithm,attack",
    [("scaffold", "free-ride-zero"), ("flora", "sign-flip")],
    ids=["scaffold-free-rider-keeps-its-variates", "flora-change-from-the-fresh-adapter"],
)
def test_attacks_measure_a_change_from_where_the_client_starts(tmp_path, algorithm, attack):
    """SCAFFOLD's free rider uploads its download's model part unchanged (its client still runs,
    so the variates it keeps exist); FLoRA's clients start from the fresh seeded adapter, which
    the download does not hold, and a sign flip is measured from it."""
    from atoll.experiment import build
    from atoll.fl.federation import Federation
    from atoll.privacy.messages import flat_delta, start_of

    settings = {**QUICK, "algorithm.name": algorithm, "attack.kind": attack, "attack.clients": "[1]", "attack.byzantine.scale": 2}
    experiment = build(config_with(tiny_overrides(tmp_path, **settings)))
    try:
        federation = Federation(experiment)
        download = federation.configure(1, 1)
        start = start_of(experiment.server.context, 1, download)
        sent = federation.train(1, 1, download).state
        if attack == "free-ride-zero":
            tensors, expected = sent.model_tensors(), start.model_tensors()
            assert tensors and all(torch.equal(tensors[k], expected[k]) for k in tensors)
            assert sent.control  # SCAFFOLD's control data still travels
        else:
            honest = flat_delta(experiment.clients[1].run(1, download).state, start, 1)[0]
            assert honest.norm() > 0
            assert torch.allclose(flat_delta(sent, start, 1)[0], -2.0 * honest, atol=1e-6)
    finally:
        experiment.close()


def test_the_noise_multiplier_is_solved_from_a_target_epsilon(tmp_path):
    """target_epsilon 8 over 3 rounds at q = 1: the resolved z spends at most 8, and barely less."""
    from atoll.resolve import resolve

    config = config_with(tiny_overrides(tmp_path, **{"federation.rounds": 3, "privacy.dp.mode": "fixed", "privacy.dp.target_epsilon": 8}))
    noise = resolve(config).config.privacy.dp.noise_multiplier
    assert config.privacy.dp.noise_multiplier is None  # the user's config is not changed
    assert opacus_epsilon(noise, 1.0, 3, 1e-5) <= 8.0 < opacus_epsilon(noise * 0.99, 1.0, 3, 1e-5)


def test_secure_aggregation_gives_the_plain_runs_adapter_up_to_quantization(tmp_path, plain_run):
    """The server aggregates only the unmasked sum, and the global adapter is the plain weighted
    mean's to within the quantizer's step (2^-20 of [-0.5, 0.5]); one round's dropout is recovered."""
    secure_dir, records, _ = run(tmp_path / "secure", **{"federation.rounds": 1, "privacy.secagg.enabled": "true"})
    plain, secure = adapter(plain_run[0]), adapter(secure_dir)
    assert plain.keys() == secure.keys()
    largest = max(float((plain[k].double() - secure[k].double()).abs().max()) for k in plain)
    assert largest < 1e-5, largest
    protection = records[0]["protection"]
    assert protection["secagg_failed"] == 0.0 and protection["secagg_participants"] == 4.0 and protection["secagg_dropped"] == 0.0
    assert protection["secagg_bytes_up"] > 0

    _, records, _ = run(tmp_path / "dropout", **{"federation.rounds": 1, "privacy.secagg.enabled": "true", "privacy.secagg.dropout": 0.25})
    assert records[0]["protection"]["secagg_dropped"] == 1.0 and records[0]["protection"]["secagg_failed"] == 0.0


def test_secure_aggregation_past_the_threshold_drops_the_round_and_the_run_goes_on(tmp_path, plain_run):
    """Threshold 4 of 4 and a quarter dropping: every round fails cleanly, the adapter stays the initial one."""
    settings = {"privacy.secagg.enabled": "true", "privacy.secagg.threshold": 4, "privacy.secagg.dropout": 0.25}
    run_dir, records, _ = run(tmp_path, **settings)
    assert [r["protection"]["secagg_failed"] for r in records] == [1.0, 1.0]
    plain = adapter(plain_run[0])
    assert any(not torch.equal(plain[k], adapter(run_dir)[k]) for k in plain)  # the plain run moved; this one did not


def test_the_realistic_simulation_charges_secure_aggregation_and_stops_at_the_dp_budget(tmp_path):
    """Secure aggregation with DP in the event simulation: the round's ε is the accountant's, its
    uploads (keys, shares, masked input, three extra message round trips) cost more bytes and more
    simulated time than the plain run's round, and a budget between round 1's and round 2's ε ends
    the run after round 1."""
    system = tmp_path / "sys.yaml"
    system.write_text("devices: {mix: {laptop: 1}}\nnetworks: {mix: {ethernet: 1}}\n")
    realistic = {"mode": "realistic", "system": str(system)}
    _, plain, _ = run(tmp_path / "plain", **realistic, **{"federation.rounds": 1})
    budget = (opacus_epsilon(1.0, 1.0, 1, 1e-5) + opacus_epsilon(1.0, 1.0, 2, 1e-5)) / 2
    settings = {
        **realistic,
        "privacy.secagg.enabled": "true",
        "privacy.dp.mode": "fixed",
        "privacy.dp.noise_multiplier": 1.0,
        "privacy.dp.budget_epsilon": budget,
    }
    _, records, summary = run(tmp_path / "protected", **settings)
    assert [r["round"] for r in records] == [1]
    protection = records[0]["protection"]
    assert protection["dp_epsilon"] == pytest.approx(opacus_epsilon(1.0, 1.0, 1, 1e-5), rel=1e-9)
    assert protection["secagg_failed"] == 0.0
    assert records[0]["bytes_up"] > plain[0]["bytes_up"]
    assert records[0]["virtual_time"] > plain[0]["virtual_time"]
    assert "privacy budget" in summary["stopped_by"]


def test_krum_keeps_a_sign_flipping_attacker_out(tmp_path):
    """5 clients, client 4 sends −10 × its change; Krum (f = 1) picks one honest update each round."""
    settings = {
        "federation.clients": 5,
        "attack.kind": "sign-flip",
        "attack.clients": "[4]",
        "attack.byzantine.scale": 10,
        "robust.rule": "krum",
    }
    _, records, _ = run(tmp_path, **settings)
    assert [(r["protection"]["robust_kept"], r["protection"]["robust_attackers_kept"]) for r in records] == [(1.0, 0.0)] * 2


def test_update_validation_drops_a_huge_update_and_the_round_goes_on(tmp_path):
    """A free rider sends its download plus N(0, 1) noise; validation (max norm 5) drops it with the
    client id and the reason, and the other three are aggregated."""
    settings = {
        "attack.kind": "free-ride-noise",
        "attack.clients": "[1]",
        "attack.byzantine.stddev": 1.0,
        "robust.validation.enabled": "true",
        "robust.validation.max_norm": 5,
    }
    _, records, summary = run(tmp_path, **settings)
    for record in records:
        assert [d["client"] for d in record["dropped_updates"]] == [1]
        assert "robust.validation.max_norm" in record["dropped_updates"][0]["reason"]
    assert summary["rounds"] == 2


def test_example_level_dp_sgd_reports_the_clients_epsilon(tmp_path):
    """DP-SGD in every client: the round's ε is the accountant's for the worst client's (q, steps)."""
    from atoll.privacy.dp.accounting import epsilon_after

    _, records, _ = run(tmp_path, **{"federation.rounds": 1, "privacy.dpsgd.enabled": "true", "privacy.dpsgd.noise_multiplier": 1.5})
    protection = records[0]["protection"]
    assert protection["dpsgd_noise_multiplier"] == 1.5
    # 600 examples over 4 clients (80 % train): the smallest client sets q = 16 / n for one step
    assert 0 < protection["dpsgd_epsilon"] <= epsilon_after(1.5, 1.0, 1, 1e-5)


def test_the_server_rebuilds_a_clients_text_from_its_update_and_not_under_dp_sgd(tmp_path):
    """tiny-llama on synthetic instructions, client 0 takes one SGD step on one 16-token sequence:
    from the plain upload the server's DAGER span test rebuilds it (all but the last token, which
    no loss reads); with DP-SGD's noise added in the client it rebuilds almost nothing of it."""
    from helpers import RECONSTRUCTION_CASE

    settings = RECONSTRUCTION_CASE
    _, records, _ = run(tmp_path / "plain", **settings)
    plain = records[0]["protection"]
    assert plain["reconstruction_individual_update"] == 1.0 and plain["reconstruction_sequences"] == 1.0
    assert plain["reconstruction_rouge1"] > 0.8 and plain["reconstruction_rougeL"] > 0.8
    # central DP would not help here: the server that adds the noise sees the update before it
    noisy_settings = {**settings, "privacy.dpsgd.enabled": "true", "privacy.dpsgd.noise_multiplier": 0.1}
    _, records, _ = run(tmp_path / "dpsgd", **noisy_settings)
    assert records[0]["protection"]["reconstruction_rougeL"] < 0.2


REFUSED = [
    ({"algorithm.name": "flexlora", "privacy.dp.mode": "fixed"}, "neither aggregates by a weighted mean"),
    ({"algorithm.name": "flexlora", "privacy.secagg.enabled": "true"}, "cannot run under secure aggregation"),
    ({"privacy.secagg.enabled": "true", "robust.rule": "krum", "federation.clients": 5}, "sees only their sum"),
    ({"privacy.secagg.enabled": "true", "robust.validation.enabled": "true"}, "sees only their sum"),
    ({"privacy.dp.mode": "fixed", "robust.rule": "median"}, "choose DP or a robust rule"),
    ({"robust.rule": "krum"}, "more than 2f + 2"),
    ({"privacy.dp.mode": "adaptive"}, "the clipped count's noise 0.2 must exceed half the noise multiplier 1"),
    ({"attack.kind": "alie", "attack.clients": "[1]"}, "at least 2 attackers"),
    ({"attack.kind": "sign-flip"}, "no client attacks"),
    ({"privacy.secagg.enabled": "true", "engine": "flower"}, "use flower.secagg.enabled: true instead of privacy.secagg"),
    ({"privacy.dp.mode": "fixed", "privacy.dp.noise_multiplier": 1, "privacy.dp.target_epsilon": 3}, "not both"),
]


@pytest.mark.parametrize("settings,message", REFUSED, ids=[m for _, m in REFUSED])
def test_incompatible_combinations_are_refused_in_one_line(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        check(config_with(tiny_overrides(tmp_path, **settings)))
    assert "\n" not in str(error.value)
