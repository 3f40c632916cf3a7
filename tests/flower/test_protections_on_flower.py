"""``privacy:``, ``robust:`` and ``attack:`` on the Flower engine: the ServerApp runs the server-side
stages (validation, DP-FedAvg with its accountant, robust rules, attack metrics), each ClientApp the
client-side ones and the attackers' behaviours, and for the same config and seed the run is the
local engine's.

The Flower runs go through the real ServerApp and ClientApp with the in-process Grid of
test_every_algorithm (every message deflated and inflated, every node's state through protobuf
between messages, the ClientApps' federation separate from the ServerApp's); what Flower cannot do
is refused before anything starts, one line with exit code 2.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from atoll.cli import app
from atoll.config import config_with
from atoll.fl import stages as stage_registry
from atoll.fl.stages import ClientBehaviour
from atoll.fl.state import AdapterState
from conftest import tiny_overrides
from helpers import assert_same_length, forget_flower_client_experiments, read_records, read_summary
from test_every_algorithm import assert_close, run_on_flower

pytestmark = pytest.mark.usefixtures("flower_isolation")

# 2 rounds of 1 local step: the runs check the wiring, not learning
QUICK = {"federation.rounds": 2, "train.local_steps": 1, "eval.local": "never", "eval.initial": "false", "run.plots": "false"}
TOLERANCE = 1e-6


def on_flower(tmp_path, **settings):
    """The tiny federation with ``settings`` through Flower's ServerApp and ClientApps: its run directory."""
    config = config_with(tiny_overrides(tmp_path / "roots", **{**QUICK, **settings, "engine": "flower"}))
    forget_flower_client_experiments()
    run_on_flower(config, tmp_path / "flower")
    return tmp_path / "flower"


def records(run_dir):
    return read_records(run_dir, drop=("seconds", "wall_seconds", "flower"))


def assert_same_run(flower_dir, local_dir):
    """Every round record (metrics, protection metrics, dropped updates) and the final adapter agree."""
    got, expected = records(flower_dir), records(local_dir)
    assert_same_length(got, expected, "metrics records")
    for flower_record, local_record in zip(got, expected, strict=True):
        assert_close(flower_record, local_record, f"round {local_record['round']}")
    flower_adapter, local_adapter = adapter(flower_dir), adapter(local_dir)
    assert set(flower_adapter) == set(local_adapter)
    for key in local_adapter:
        assert torch.allclose(flower_adapter[key], local_adapter[key], rtol=0, atol=TOLERANCE), key


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def opacus_epsilon(noise: float, rate: float, rounds: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise, rate, rounds)]
    return accountant.get_epsilon(delta=delta)


def test_dp_fedavg_on_flower_spends_and_stops_as_on_the_local_engine(tmp_path, reference_runs):
    """DP-FedAvg in the ServerApp: 2 of 4 clients per round, z = 1.2, every update clipped, a budget
    between round 2's ε and round 3's. The ε of every round is the local engine's and opacus' for
    (q, z, rounds, δ), both runs stop after round 2, and the noised adapter is the same."""
    expected = {r: opacus_epsilon(1.2, 0.5, r, 1e-5) for r in (1, 2, 3)}
    settings = {
        **QUICK,
        "federation.rounds": 4,
        "federation.sample_rate": 0.5,
        "privacy.dp.mode": "fixed",
        "privacy.dp.noise_multiplier": 1.2,
        "privacy.dp.clip_norm": 1e-4,
        "privacy.dp.budget_epsilon": (expected[2] + expected[3]) / 2,
        "eval.every": 10,
    }
    local = reference_runs.get(**settings)
    flower = on_flower(tmp_path, **settings)
    trained = [r for r in records(flower) if r["round"] > 0]
    assert [r["round"] for r in trained] == [1, 2]
    for record in trained:
        assert record["protection"]["dp_epsilon"] == pytest.approx(expected[record["round"]], rel=1e-9)
        assert record["protection"]["dp_clipped"] == 2.0
    assert_same_run(flower, local)
    summary, local_summary = read_summary(flower), read_summary(local)
    assert "privacy budget" in summary["stopped_early"] and summary["stopped_early"] == local_summary["stopped_early"]
    assert summary["protection"]["dp_epsilon"] == pytest.approx(expected[2], rel=1e-9)
    assert summary["engine"]["dp"] == "none"  # privacy.dp, not Flower's wrappers


def test_a_median_against_sign_flippers_on_flower_is_the_local_engines(tmp_path, reference_runs):
    """Clients 2 and 3 upload −3 × their change (built in their ClientApps); the ServerApp's
    coordinate-wise median gives the local engine's adapter to 1e-6, and the attack moved it. The
    ServerApp's membership attack on the final model scores what the local engine's does."""
    settings = {**QUICK, "robust.rule": "median", "attack.membership.enabled": "true", "attack.membership.examples": 40}
    attack = {"attack.kind": "sign-flip", "attack.clients": "[2, 3]", "attack.byzantine.scale": 3}
    local = reference_runs.get(**settings, **attack)
    flower = on_flower(tmp_path, **settings, **attack)
    assert_same_run(flower, local)
    assert "membership_global_loss_auc" in records(flower)[-1]["protection"]
    honest = adapter(reference_runs.get(**settings))
    attacked = adapter(flower)
    assert any(not torch.allclose(attacked[k], honest[k], rtol=0, atol=1e-4) for k in honest), "the attackers changed nothing"


# attacks the ClientApps build from more than their own training: ALIE from every colluder's honest
# change (each attacker's ClientApp trains its colluders' too), a stale free rider from the download
# of its previous round (kept in its node's state between messages)
CRAFTED = {
    "alie": {"attack.kind": "alie", "attack.clients": "[2, 3]"},
    "free-ride-stale": {"attack.kind": "free-ride-stale", "attack.clients": "[1]", "federation.rounds": 3},
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_attacks_crafted_in_the_clientapps_match_the_local_engine(tmp_path, reference_runs, kind):
    settings = {**QUICK, **CRAFTED[kind]}
    assert_same_run(on_flower(tmp_path, **settings), reference_runs.get(**settings))


class NaNUpload(ClientBehaviour):
    """Trains honestly, then puts a NaN into the first LoRA factor it uploads."""

    name = "nan-upload"

    def train(self, round, client_id, download, honest):
        update = honest()
        tensors = update.state.to_tensors()
        key = sorted(k for k in tensors if k.startswith("lora.") and k.endswith(".B"))[0]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = math.nan
        update.state = AdapterState.from_tensors(tensors)
        return update


def test_a_nan_update_is_dropped_and_recorded_on_flower_and_the_run_goes_on(tmp_path, monkeypatch):
    """With robust.validation, the ServerApp drops client 1's NaN upload every round, records its id
    and the reason, and aggregates the other three: the run ends with a finite model."""
    monkeypatch.setitem(stage_registry.BEHAVIOURS, NaNUpload.name, NaNUpload)
    flower = on_flower(tmp_path, **{"federation.behaviours": "{1: nan-upload}", "robust.validation.enabled": "true"})
    trained = [r for r in records(flower) if r["round"] > 0]
    assert [r["round"] for r in trained] == [1, 2]
    for record in trained:
        assert [d["client"] for d in record["dropped_updates"]] == [1]
        assert (
            record["dropped_updates"][0]["reason"].startswith("validate: part 'lora.")
            and "NaN or Inf" in record["dropped_updates"][0]["reason"]
        )
        assert math.isfinite(record["global"]["loss"])
    assert all(bool(torch.isfinite(t).all()) for t in adapter(flower).values())


# Flower's client-side fixed clipping at a bound far below every update's norm, no noise, one round
CLIENT_CLIP = {"federation.rounds": 1, "flower.dp.mode": "client-fixed", "flower.dp.clipping_norm": 1e-3, "flower.dp.noise_multiplier": 0.0}


def test_flowers_client_side_clipping_clips_the_attackers_too(tmp_path):
    """Flower's clipping mod runs in every ClientApp, an attacker's included (docs/flower.md): with
    flower.dp client-fixed at a bound far below every update and no noise, a client uploading
    −1000 × its change still moves the global adapter by at most the bound, and moves it (the
    honest clients' clipped mean alone would be another adapter)."""
    from helpers import clipped_round_one

    clip = CLIENT_CLIP["flower.dp.clipping_norm"]
    settings = CLIENT_CLIP
    attack = {"attack.kind": "sign-flip", "attack.clients": "[3]", "attack.byzantine.scale": 1000}
    flower = on_flower(tmp_path, **settings, **attack)
    config = config_with(tiny_overrides(tmp_path / "roots", **{**QUICK, **settings, "engine": "flower"}))
    honest = clipped_round_one(config, clip, tmp_path / "computed")
    assert min(honest.update_norms) > 10 * clip, "the bound must clip every update"
    got, initial = adapter(flower), load_file(str(honest.initial_adapter / "adapter_model.safetensors"))
    without_attack = load_file(str(honest.expected_adapter / "adapter_model.safetensors"))
    moved = float(torch.sqrt(sum(((got[k].double() - initial[k].double()) ** 2).sum() for k in got)))
    assert moved <= clip * (1 + 1e-4), "the attacker's update went out unclipped"
    assert any(not torch.allclose(got[k], without_attack[k], rtol=0, atol=1e-7) for k in got), "the attacker changed nothing"


def test_flowers_client_side_clipping_gives_the_mean_of_the_clipped_updates(tmp_path):
    """Flower's ``fixedclipping_mod`` in the ClientApps and its client-side fixed-clipping wrapper in
    the ServerApp, a bound far below every update's norm and no noise: after one round the global
    adapter is the initial one plus the equal-weight mean of the clipped updates, computed here."""
    from helpers import clipped_round_one

    clip = CLIENT_CLIP["flower.dp.clipping_norm"]
    settings = CLIENT_CLIP
    flower = on_flower(tmp_path, **settings)
    assert read_summary(flower)["engine"]["dp"] == "client-fixed"
    config = config_with(tiny_overrides(tmp_path / "roots", **{**QUICK, **settings, "engine": "flower"}))
    expected = clipped_round_one(config, clip, tmp_path / "computed")
    assert len(expected.update_norms) == 4 and min(expected.update_norms) > 10 * clip, "the bound must clip every update"
    got = adapter(flower)
    want = load_file(str(expected.expected_adapter / "adapter_model.safetensors"))
    initial = load_file(str(expected.initial_adapter / "adapter_model.safetensors"))
    assert set(got) == set(want) == set(initial)
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=TOLERANCE), key
    moved = torch.sqrt(sum(((got[key] - initial[key]) ** 2).sum() for key in got))
    # the mean of updates clipped to the bound moves the global by at most the bound (less where the
    # clients' directions differ: 0.45 of it here, with one local step)
    assert clip / 10 < float(moved) <= clip * (1 + 1e-4), "the clipped mean moved the global adapter by more than the bound, or not at all"


def test_dp_sgd_and_an_attacker_under_flowers_secagg_match_the_local_engine(tmp_path, reference_runs):
    """DP-SGD in every ClientApp and a sign-flipping attacker under Flower's SecAgg+, so the ServerApp
    sees only the masked sum: every round agrees with the local engine's run without SecAgg+ to
    1e-4 (SecAgg+ quantizes each upload), DP-SGD's ε is the same, and the attacker moved the model
    (masking hides who attacked, not the attack)."""
    dpsgd = {**QUICK, "privacy.dpsgd.enabled": "true", "privacy.dpsgd.noise_multiplier": 0.5}
    attack = {"attack.kind": "sign-flip", "attack.clients": "[3]", "attack.byzantine.scale": 3}
    local = reference_runs.get(**dpsgd, **attack)
    flower = on_flower(tmp_path, **dpsgd, **attack, **{"flower.secagg.enabled": "true"})
    assert read_summary(flower)["engine"]["secagg"] is True
    got, expected = records(flower), records(local)
    assert_same_length(got, expected, "metrics records")
    assert [r["round"] for r in got] == [0, 1, 2]
    for flower_record, local_record in zip(got[1:], expected[1:], strict=True):
        if flower_record["round"] == 1:
            assert flower_record["train"] == local_record["train"]  # before any aggregation: identical
        assert flower_record["global"]["loss"] == pytest.approx(local_record["global"]["loss"], abs=1e-4)
        assert flower_record["bytes_up"] == local_record["bytes_up"]
        assert flower_record["protection"]["dpsgd_epsilon"] == pytest.approx(local_record["protection"]["dpsgd_epsilon"], rel=1e-9)
        assert flower_record["protection"]["dpsgd_epsilon"] > 0
    got_adapter, local_adapter = adapter(flower), adapter(local)
    for key in local_adapter:
        assert torch.allclose(got_adapter[key], local_adapter[key], rtol=0, atol=1e-4), key
    honest = adapter(reference_runs.get(**dpsgd))
    assert any(not torch.allclose(got_adapter[k], honest[k], rtol=0, atol=1e-3) for k in honest), "the attacker changed nothing"


def test_the_servers_text_reconstruction_on_flower_is_the_local_engines(tmp_path, reference_runs):
    """The ServerApp's DAGER-style span test on each individual upload (tiny-llama, one SGD step on
    one 16-token sequence): it rebuilds the client's text on Flower exactly as on the local engine
    (records and adapter to 1e-6)."""
    from helpers import RECONSTRUCTION_CASE

    settings = {**QUICK, **RECONSTRUCTION_CASE}
    flower = on_flower(tmp_path, **settings)
    assert_same_run(flower, reference_runs.get(**settings))
    protection = records(flower)[1]["protection"]  # round 1's upload
    assert protection["reconstruction_individual_update"] == 1.0 and protection["reconstruction_rougeL"] > 0.8


@pytest.mark.slow
def test_protections_and_a_backdoor_with_node_local_data_match_the_local_engine(tmp_path):
    """flower.node_data: each node reads only its own file (its attacker poisons only its own rows),
    the ServerApp holds only data.test_source. DP-SGD in the nodes (its ε from the example counts
    they report), DP-FedAvg, validation and a backdoor whose success rate the ServerApp measures on
    its own test set give the local engine's run over the same rows (the natural partition of the
    files concatenated)."""
    from flwr.app import Context, RecordDict

    from atoll.dispatch import start_run
    from atoll.engines.flower import protocol
    from atoll.engines.flower.server import run_server
    from atoll.report.progress import Progress
    from atoll.resolve import resolve
    from test_every_algorithm import InProcessGrid
    from test_node_data import local_config, natural_files, node_config

    files = natural_files(tmp_path)
    settings = {
        **QUICK,
        "eval.local": "never",
        "privacy.dp.mode": "fixed",
        "privacy.dp.clip_norm": 0.05,
        "privacy.dp.noise_multiplier": 0.3,
        "privacy.dpsgd.enabled": "true",
        "privacy.dpsgd.noise_multiplier": 0.5,
        "robust.validation.enabled": "true",
        "attack.kind": "backdoor",
        "attack.clients": "[1]",
        "attack.backdoor.eval_examples": 20,
    }
    local_run = tmp_path / "local"
    start_run(local_config(tmp_path / "roots", files, **settings, **{"run.dir": str(local_run)}), Progress())
    config = node_config(tmp_path / "roots", files, **settings)
    run_config = protocol.run_config_for(resolve(config), tmp_path / "flower")
    grid = InProcessGrid(run_config, 3)
    for client_id, data_file in enumerate(files[0]):
        grid.contexts[100 + client_id].node_config["data-file"] = str(data_file)
    forget_flower_client_experiments()
    run_server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    assert_same_run(tmp_path / "flower", local_run)
    last = records(tmp_path / "flower")[-1]["protection"]
    assert "attack_success_rate" in last and last["dp_epsilon"] > 0 and last["dpsgd_epsilon"] > 0


# what Flower cannot do, and the words of its one-line refusal
NODE_DATA = {"flower.mode": "deployment", "flower.node_data": "true", "flower.superlink": "127.0.0.1:9093", "flower.insecure": "true"}
REFUSED = {
    "atoll-secagg": ({"privacy.secagg.enabled": "true"}, "use flower.secagg.enabled: true instead of privacy.secagg"),
    "dp-and-flower-dp": ({"privacy.dp.mode": "fixed", "flower.dp.mode": "server-fixed"}, "flower.dp adds its own clipping"),
    "dp-and-secagg+": ({"privacy.dp.mode": "fixed", "flower.secagg.enabled": "true"}, "the ServerApp sees only the mean"),
    "adaptive-client-clipping": (
        {"privacy.dp.mode": "adaptive", "privacy.dp.clip_at": "client"},
        "adaptive clipping at the client needs the bound the server moves",
    ),
    "robust-and-flower-dp": ({"robust.rule": "median", "flower.dp.mode": "client-fixed"}, "calibrated to a plain mean"),
    "robust-and-secagg+": ({"robust.rule": "median", "flower.secagg.enabled": "true"}, "shows the ServerApp only the mean"),
    "validation-and-secagg+": ({"robust.validation.enabled": "true", "flower.secagg.enabled": "true"}, "sees only their masked sum"),
    "alie-with-client-state": (
        {"attack.kind": "alie", "attack.clients": "[2, 3]", "algorithm.name": "scaffold"},
        "keeps each client's private state on that client's own node",
    ),
    "ipm-with-node-data": ({"attack.kind": "ipm", "attack.clients": "[2, 3]", **NODE_DATA}, "holds only its own client's data"),
    "reconstruction-and-secagg+": (
        {"attack.reconstruction.enabled": "true", "flower.secagg.enabled": "true"},
        "attacks individual updates",
    ),
    "fltrust-with-node-data": ({"robust.rule": "fltrust", **NODE_DATA}, "robust.rule fltrust needs the clients' data"),
    "membership-with-node-data": ({"attack.membership.enabled": "true", **NODE_DATA}, "attack.membership needs the clients' data"),
    "backdoor-with-node-data": ({"attack.kind": "backdoor", "attack.clients": "[1]", **NODE_DATA}, "set data.test_source"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_what_flower_cannot_do_is_refused_in_one_line(tmp_path, name):
    settings, words = REFUSED[name]
    config = tmp_path / "defaults.yaml"
    config.write_text("{}\n")
    args = ["run", str(config), "--quiet", "--engine", "flower"]
    for item in tiny_overrides(tmp_path / "runs", **settings):
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and words in result.output, result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.xdist_group("flower-runtime")  # with the other tests that start Flower runtimes, one at a time
def test_protections_and_an_attack_in_flowers_simulation_engine_match_the_local_engine(tmp_path, reference_runs):
    """One run of Flower's simulation engine (a SuperLink, Ray actors as ClientApps, started by
    `atoll run --engine flower`): DP-FedAvg clipped in the ClientApps, DP-SGD in them, a sign-flipping
    attacker that skips the client-side clip (it controls its device), validation with a norm bound
    in the ServerApp. Records, ε and the adapter are the local engine's."""
    from test_simulation import run_on_flower as simulate

    settings = {
        **QUICK,
        "privacy.dp.mode": "fixed",
        "privacy.dp.clip_at": "client",
        "privacy.dp.clip_norm": 0.01,
        "privacy.dp.noise_multiplier": 0.5,
        "privacy.dpsgd.enabled": "true",
        "privacy.dpsgd.noise_multiplier": 0.5,
        "attack.kind": "sign-flip",
        "attack.clients": "[3]",
        "attack.byzantine.scale": 50,
        "robust.validation.enabled": "true",
        "robust.validation.max_norm": 0.02,
    }
    local = reference_runs.get(**settings)
    flower, _ = simulate(tmp_path, **settings)
    assert_same_run(flower, local)
    trained = [r for r in records(flower) if r["round"] > 0]
    assert all(r["protection"]["dp_epsilon"] > 0 and r["protection"]["dpsgd_epsilon"] > 0 for r in trained)
    assert [d["client"] for r in trained for d in r.get("dropped_updates", [])] == [3, 3], "the unclipped attacker is dropped"
