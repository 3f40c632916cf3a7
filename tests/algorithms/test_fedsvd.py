"""FedSVD: B_new A_new = B_bar A and A_new A_new^T = I_r, exact aggregation when clients share A,
B-only uploads, a frozen A on the client, no per-client state, and an end-to-end run."""

import itertools

import pytest
import torch

from atoll.algorithms.fedsvd import refactorize
from atoll.config import config_with
from atoll.resolve import check
from atoll.errors import ConfigError, UpdateError
from atoll.fl.state import AdapterState, LoRAFactors
from optsvd_helpers import (  # noqa: F401 (no_plots is an autouse fixture)
    no_plots,
    MODULES,
    RANK,
    SIZES,
    assert_finite_run,
    ideal_delta,
    last_checkpoint,
    make_client,
    make_server,
    random_state,
    run,
    updates_for,
    weights_of,
)


def clients_sharing_A(global_state, seeds):
    """Client adapters as FedSVD produces them: the global A, each its own B and head."""
    states = []
    for seed in seeds:
        own = random_state(seed)
        lora = {n: LoRAFactors(global_state.lora[n].A.clone(), own.lora[n].B, global_state.lora[n].scale) for n in MODULES}
        states.append(AdapterState(lora, own.extra))
    return states


def uploads(states):
    client = make_client("fedsvd")
    return [client.upload(1, s, s) for s in states]


def test_refactorisation_preserves_the_product_and_orthonormalises_A():
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(12, 4, generator=gen), torch.randn(4, 9, generator=gen)
    A_new, B_new = refactorize(B, A)
    assert torch.allclose(B_new @ A_new, B @ A, atol=1e-5)
    assert torch.allclose(A_new @ A_new.T, torch.eye(4), atol=1e-5)
    # B_new = U_r S_r: its columns are orthogonal with descending norms (the singular values)
    gram = B_new.T @ B_new
    assert torch.allclose(gram, torch.diag(torch.diagonal(gram)), atol=1e-4)
    assert bool((torch.diagonal(gram)[:-1] >= torch.diagonal(gram)[1:]).all())


def test_aggregation_is_exact_with_unequal_weights_and_A_comes_back_orthonormal():
    x = random_state(1)
    states = clients_sharing_A(x, range(10, 14))
    server = make_server("fedsvd", initial=x)
    server.aggregate(1, updates_for(uploads(states)))
    weights = weights_of()
    for name in MODULES:
        new = server.global_state.lora[name]
        B_bar = sum(w * s.lora[name].B for w, s in zip(weights, states, strict=True))
        assert torch.allclose(new.B @ new.A, B_bar @ x.lora[name].A, atol=1e-5)
        assert torch.allclose(new.delta().double(), ideal_delta(states, name), atol=1e-5)  # = sum p_k s B_k A
        assert torch.allclose(new.A @ new.A.T, torch.eye(RANK), atol=1e-5)
        assert new.scale == x.lora[name].scale
    head = sum(w * s.extra["head.weight"] for w, s in zip(weights, states, strict=True))
    assert torch.allclose(server.global_state.extra["head.weight"], head, atol=1e-6)


def test_permutation_invariance_and_identical_inputs_keep_the_product():
    x = random_state(2)
    states = clients_sharing_A(x, range(20, 24))
    ups = uploads(states)
    products = []
    for order in itertools.permutations(range(4)):
        server = make_server("fedsvd", initial=x)
        server.aggregate(1, updates_for([ups[i] for i in order], [SIZES[i] for i in order], ids=list(order)))
        products.append({n: server.global_state.lora[n].delta() for n in MODULES})
    for other in products[1:]:
        for name in MODULES:
            assert torch.allclose(other[name], products[0][name], atol=1e-5)
    server = make_server("fedsvd", initial=x)
    server.aggregate(1, updates_for(uploads([states[0]] * 4)))
    for name in MODULES:
        assert torch.allclose(server.global_state.lora[name].delta(), states[0].lora[name].delta(), atol=1e-5)


def test_upload_carries_B_and_head_only_and_A_is_frozen():
    state = random_state(3)
    client = make_client("fedsvd")
    upload = client.upload(1, state, state)
    assert set(upload.lora) == set(MODULES) and set(upload.extra) == set(state.extra)
    for name in MODULES:  # B as a LoRA factor with A left out: protections see it as model data
        assert upload.lora[name].A is None and torch.equal(upload.lora[name].B, state.lora[name].B)
    assert upload.nbytes() < state.nbytes()
    assert client.trainable(1).lora_A is False and client.trainable(1).lora_B is True
    server = make_server("fedsvd", initial=state)
    bad = AdapterState({n: f for n, f in upload.lora.items() if n != "q"}, dict(upload.extra))
    with pytest.raises(UpdateError):
        server.aggregate(1, updates_for([upload, bad], SIZES[:2]))


def test_mixed_ranks_are_refused():
    with pytest.raises(ConfigError, match="cannot aggregate different LoRA ranks"):
        check(config_with(["algorithm.name=fedsvd", "model.lora.client_ranks={0: 4}"]))


def test_end_to_end_orthonormal_A_and_nothing_stored_per_client(tmp_path):
    path, summary = run(tmp_path, "fedsvd")
    assert_finite_run(path, summary)
    tensors, clients = last_checkpoint(path)
    assert clients == {}  # no model clone, no private state: a client is its data
    A_keys = [k for k in tensors if k.startswith("global.lora.") and k.endswith(".A")]
    assert A_keys
    for key in A_keys:
        A = tensors[key]
        assert torch.allclose(A @ A.T, torch.eye(A.shape[0]), atol=1e-4)
