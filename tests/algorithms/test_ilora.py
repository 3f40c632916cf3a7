"""ILoRA: the QR init leaves the effective weight at W0 with B^T B = I; aggregation re-factorises
sum_k p_k s_k B_k A_k by truncated QR (exact when its rank fits, the projection onto its first r
columns otherwise), handles the scale, and keeps B^T B = I; the base is rebuilt, never sent."""

import itertools

import pytest
import torch

from atoll.config import config_with
from atoll.resolve import check
from atoll.errors import ConfigError
from atoll.experiment import build
from atoll.fl.state import AdapterState, LoRAFactors
from conftest import tiny_overrides
from optsvd_helpers import (  # noqa: F401 (no_plots is an autouse fixture)
    no_plots,
    MODULES,
    RANK,
    SCALE,
    SIZES,
    assert_finite_run,
    base_weights,
    ideal_delta,
    initial_state,
    make_client,
    make_server,
    random_state,
    run,
    task_metrics,
    updates_for,
)

W0 = base_weights()


def server(**kwargs):
    return make_server("ilora", base_weight=lambda name: W0[name].clone(), **kwargs)


def test_qr_init_keeps_the_effective_weight_and_gives_orthonormal_B():
    state = server().global_state
    for name in MODULES:
        factors = state.lora[name]
        assert torch.allclose(state.effective_delta(name), torch.zeros_like(W0[name]), atol=1e-5)  # W0 + base + sBA = W0
        assert torch.allclose(factors.B.T @ factors.B, torch.eye(RANK), atol=1e-5)
        assert factors.scale == SCALE
        # s B A = Q_r R_r: the projection of W0 onto the span of its first r columns
        Q = torch.linalg.qr(W0[name].double())[0][:, :RANK]
        assert torch.allclose(factors.delta().double(), Q @ Q.T @ W0[name].double(), atol=1e-5)
    assert torch.equal(state.extra["head.weight"], initial_state().extra["head.weight"])


def test_exact_when_the_average_fits_in_rank_r_with_unequal_weights():
    shared_B = random_state(1).lora
    states = []
    for seed in range(10, 14):
        own = random_state(seed)
        states.append(AdapterState({n: LoRAFactors(own.lora[n].A, shared_B[n].B.clone(), SCALE) for n in MODULES}, own.extra))
    s = server()
    s.aggregate(1, updates_for(states))
    for name in MODULES:
        new = s.global_state.lora[name]
        assert torch.allclose(new.delta().double(), ideal_delta(states, name), atol=1e-5)
        assert torch.allclose(new.B.T @ new.B, torch.eye(RANK), atol=1e-5)
    assert torch.equal(s.global_state.base["q"], server().global_state.base["q"])  # the base never changes


def test_generic_average_is_projected_onto_its_first_r_columns():
    states = [random_state(20 + i) for i in range(4)]
    s = server()
    s.aggregate(1, updates_for(states))
    for name in MODULES:
        ideal = ideal_delta(states, name)
        Q = torch.linalg.qr(ideal)[0][:, :RANK]
        got = s.global_state.lora[name].delta().double()
        assert torch.allclose(got, Q @ Q.T @ ideal, atol=1e-5)
        assert torch.linalg.norm(got - ideal) > 0.05 * torch.linalg.norm(ideal)  # truncation loses the rest


def test_client_scales_are_applied_and_the_global_scale_is_divided_out():
    states = [random_state(30 + i) for i in range(4)]
    # the same products s_k B_k A_k written with another client scale
    rescaled = [AdapterState({n: LoRAFactors(f.A * SCALE / 0.5, f.B, 0.5) for n, f in st.lora.items()}, st.extra) for st in states]
    first, second = server(), server()
    first.aggregate(1, updates_for(states))
    second.aggregate(1, updates_for(rescaled))
    # a global adapter with scale 0.5 instead of SCALE
    third = make_server("ilora", initial=random_state(1000 + RANK, RANK, 0.5, zero_B=True), base_weight=lambda n: W0[n].clone())
    third.aggregate(1, updates_for(states))
    for name in MODULES:
        a, b, c = (x.global_state.lora[name] for x in (first, second, third))
        assert torch.allclose(a.B, b.B, atol=1e-5) and torch.allclose(a.A, b.A, atol=1e-5)
        assert c.scale == 0.5 and torch.allclose(c.B, a.B, atol=1e-5)
        assert torch.allclose(c.A, a.A * SCALE / 0.5, atol=1e-4)
        assert torch.allclose(c.delta(), a.delta(), atol=1e-5)


def test_permutation_invariance_and_identical_inputs_keep_the_product():
    states = [random_state(40 + i) for i in range(4)]
    results = []
    for order in itertools.permutations(range(4)):
        s = server()
        s.aggregate(1, updates_for([states[i] for i in order], [SIZES[i] for i in order], ids=list(order)))
        results.append({n: s.global_state.lora[n].delta() for n in MODULES})
    for other in results[1:]:
        for name in MODULES:
            assert torch.allclose(other[name], results[0][name], atol=1e-5)
    s = server()
    s.aggregate(1, updates_for([states[1].clone() for _ in range(4)]))
    for name in MODULES:
        assert torch.allclose(s.global_state.lora[name].delta(), states[1].lora[name].delta(), atol=1e-5)


class FakeBench:
    """Just enough workbench for compose: read access to W0."""

    class _Base:
        def pristine(self, name):
            return W0[name].clone()

    base = _Base()


def test_the_base_is_rebuilt_by_the_client_and_never_travels():
    s = server()
    download = s.configure(1, 0)
    assert not download.base and download.nbytes() < s.global_state.nbytes()
    client = make_client("ilora")
    client.context.workbench = FakeBench()
    start = client.compose(1, download)
    assert set(start.base) == set(MODULES)
    for name in MODULES:
        assert torch.equal(start.base[name], s.global_state.base[name])
    trained = AdapterState(start.lora, start.extra, start.base)
    assert not client.upload(1, start, trained).base


def test_mixed_ranks_are_refused():
    with pytest.raises(ConfigError, match="cannot aggregate different LoRA ranks"):
        check(config_with(["algorithm.name=ilora", "model.lora.client_ranks={0: 4}"]))


def test_end_to_end_starts_at_the_pristine_model(tmp_path):
    path, summary = run(tmp_path / "ilora", "ilora")
    assert_finite_run(path, summary)
    experiment = build(config_with(tiny_overrides(tmp_path / "fedit")))  # FedIT starts at B = 0: the pristine W0
    try:
        before_fedit = experiment.server.evaluate(0)
    finally:
        experiment.close()
    before_ilora = task_metrics(path)[0]["global"]
    assert before_ilora["accuracy"] == before_fedit["accuracy"]  # W0 + base + s B A = W0 before any training
    assert abs(before_ilora["loss"] - before_fedit["loss"]) < 1e-4
