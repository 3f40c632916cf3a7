"""FedMomentum: balanced factors (B^T B = A A^T), s B A + merged residual = the rank-r_eff SVD
truncation of sum_k p_k s_k B_k A_k (scales included), tau = 1 is exact, the base accumulates."""

import itertools

import pytest
import torch

from atoll.algorithms.fedmomentum import effective_rank
from atoll.config import config_with
from atoll.resolve import check
from atoll.errors import ConfigError
from optsvd_helpers import (  # noqa: F401 (no_plots is an autouse fixture)
    no_plots,
    MODULES,
    RANK,
    SIZES,
    assert_finite_run,
    ideal_delta,
    make_client,
    make_server,
    random_state,
    run,
    updates_for,
)


def truncation(matrix, rank):
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank], S


def test_effective_rank_is_the_first_count_reaching_the_energy_share():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert effective_rank(S, 9 / 14) == 1
    assert effective_rank(S, 0.9) == 2
    assert effective_rank(S, 13.5 / 14) == 3
    assert effective_rank(S, 1.0) == 3
    assert effective_rank(torch.zeros(3), 0.9) == 0


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.999])
def test_balanced_split_plus_residual_is_the_rank_r_eff_truncation(energy):
    x = random_state(0, scale=2.5)
    states = [random_state(1 + i, scale=2.5) for i in range(4)]
    server = make_server("fedmomentum", initial=x, energy=energy)
    server.aggregate(1, updates_for(states))
    merged_any = False
    for name in MODULES:
        ideal = ideal_delta(states, name)  # WITH the scales
        r_eff = server.effective_ranks[name]
        expected, S = truncation(ideal, max(RANK, r_eff))
        assert r_eff == effective_rank(S, energy)
        new = server.global_state.lora[name]
        residual = server.global_state.base.get(name, torch.zeros_like(ideal, dtype=torch.float32))
        assert torch.allclose(new.delta().double() + residual.double(), expected, atol=1e-4)
        assert torch.allclose(new.delta().double(), truncation(ideal, RANK)[0], atol=1e-4)  # LoRA = top r
        assert torch.allclose(new.B.T @ new.B, new.A @ new.A.T, atol=1e-4)  # balanced
        assert new.scale == 2.5
        merged_any |= name in server.global_state.base
    assert merged_any == any(r > RANK for r in server.effective_ranks.values())
    if energy > 0.99:
        assert merged_any  # four rank-3 clients exceed rank 3: the tail they add is merged


def test_energy_one_is_exact_and_the_base_accumulates_over_rounds():
    x = random_state(10)
    first, second = [random_state(11 + i) for i in range(4)], [random_state(21 + i) for i in range(4)]
    server = make_server("fedmomentum", initial=x, energy=1.0)
    server.aggregate(1, updates_for(first))
    old_base = {n: t.clone() for n, t in server.global_state.base.items()}
    for name in MODULES:
        assert torch.allclose(server.global_state.effective_delta(name).double(), ideal_delta(first, name), atol=1e-4)
    # clients of round 2 start from the merged base: their effective update is base + s B_k A_k
    for st in second:
        st.base = {n: t.clone() for n, t in old_base.items()}
    server.aggregate(2, updates_for(second))
    for name in MODULES:
        expected = old_base[name].double() + ideal_delta(second, name)
        assert torch.allclose(server.global_state.effective_delta(name).double(), expected, atol=1e-4)


def test_permutation_invariance_and_identical_inputs_give_the_product_back_without_merging():
    states = [random_state(30 + i) for i in range(4)]
    results = []
    for order in itertools.permutations(range(4)):
        server = make_server("fedmomentum")
        server.aggregate(1, updates_for([states[i] for i in order], [SIZES[i] for i in order], ids=list(order)))
        results.append(server.global_state)
    for other in results[1:]:
        for name in MODULES:
            assert torch.allclose(other.effective_delta(name), results[0].effective_delta(name), atol=1e-4)
    server = make_server("fedmomentum")
    server.aggregate(1, updates_for([states[0].clone() for _ in range(4)]))
    assert not server.global_state.base  # rank r fits: nothing to merge
    for name in MODULES:
        assert torch.allclose(server.global_state.lora[name].delta(), states[0].lora[name].delta(), atol=1e-4)


def test_upload_leaves_the_base_behind():
    state = random_state(40)
    state.base = {"q": torch.ones(10, 7)}
    upload = make_client("fedmomentum").upload(1, state, state)
    assert not upload.base and set(upload.lora) == set(MODULES)


def test_mixed_ranks_are_refused():
    with pytest.raises(ConfigError, match="cannot aggregate different LoRA ranks"):
        check(config_with(["algorithm.name=fedmomentum", "model.lora.client_ranks={0: 4}"]))


def test_end_to_end(tmp_path):
    path, summary = run(tmp_path, "fedmomentum")
    assert_finite_run(path, summary)


def test_checkpoint_keeps_the_merged_base():
    server = make_server("fedmomentum", energy=1.0)
    server.aggregate(1, updates_for([random_state(50 + i) for i in range(4)]))
    assert server.global_state.base
    restored = make_server("fedmomentum", energy=1.0)
    restored.load_state_dict(server.state_dict())
    for name in MODULES:
        assert torch.equal(restored.global_state.effective_delta(name), server.global_state.effective_delta(name))
