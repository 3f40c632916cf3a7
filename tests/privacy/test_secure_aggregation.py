"""Secure aggregation: exact sums, masked uploads that hide their input, dropout recovery up to
the threshold and a clean failure past it, Shamir sharing, quantisation, traffic counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atoll.privacy.errors import SecureAggregationError
from atoll.privacy.secagg import shamir
from atoll.privacy.secagg.prg import expand_mask
from atoll.privacy.secagg.protocol import Dropouts, SecAggClient, SecAggServer, secure_sum
from atoll.privacy.secagg.quantize import Quantizer

BITS = 32


def ring_inputs(count: int, length: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 2**BITS, size=length, dtype=np.uint64) for u in range(count)}


def plain_sum(inputs: dict[int, np.ndarray], ids) -> np.ndarray:
    total = np.zeros_like(next(iter(inputs.values())))
    for u in ids:
        total = total + inputs[u]
    return total & np.uint64(2**BITS - 1)


def test_shamir_any_threshold_shares_recover_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    for chosen in ([1, 2, 3], [2, 4, 5], [1, 3, 5]):
        assert shamir.combine({i: shares[i] for i in chosen}, 32) == secret
    with pytest.raises(ValueError):  # two points of a degree-2 polynomial give a random field element
        shamir.combine({1: shares[1], 2: shares[2]}, 32)


def test_prg_is_deterministic_per_seed_and_looks_uniform():
    first = expand_mask(b"\x01" * 32, 50000, BITS)
    assert np.array_equal(first, expand_mask(b"\x01" * 32, 50000, BITS))
    assert not np.array_equal(first, expand_mask(b"\x02" * 32, 50000, BITS))
    assert first.max() < 2**BITS
    counts = np.bincount((first >> np.uint64(BITS - 4)).astype(np.int64), minlength=16)
    chi2 = float(((counts - 50000 / 16) ** 2 / (50000 / 16)).sum())
    assert chi2 < 40  # 15 degrees of freedom: p < 1e-3 beyond ~37.7


def test_sum_is_exact_with_every_client_present():
    inputs = ring_inputs(5, 300)
    result = secure_sum(inputs, threshold=3, modulus_bits=BITS)
    assert np.array_equal(result.total, plain_sum(inputs, range(5)))
    assert result.included == [0, 1, 2, 3, 4] and result.dropped == []


def test_a_masked_upload_reveals_nothing_of_its_input():
    length = 20000
    inputs = {u: np.full(length, 7 * u + 1, dtype=np.uint64) for u in range(3)}  # constant, far from uniform
    clients = {u: SecAggClient(u, inputs[u], 2, BITS) for u in inputs}
    server = SecAggServer(2, length, BITS)
    roster = server.receive_keys({u: c.advertise_keys() for u, c in clients.items()})
    inboxes = server.route_shares({u: c.share_keys(roster) for u, c in clients.items()})
    masked = clients[0].masked_input(inboxes[0])
    assert np.mean(masked == inputs[0]) < 0.001  # differs from the input almost everywhere
    counts = np.bincount((masked >> np.uint64(BITS - 4)).astype(np.int64), minlength=16)
    chi2 = float(((counts - length / 16) ** 2 / (length / 16)).sum())
    assert chi2 < 40  # uniform-looking over the ring
    # and the server's view of the other uploads also sums to the exact total
    all_masked = {u: clients[u].masked_input(inboxes[u]) for u in (1, 2)} | {0: masked}
    included = server.receive_masked(all_masked)
    total = server.unmask({u: clients[u].unmasking_shares(included) for u in included})
    assert np.array_equal(total, plain_sum(inputs, range(3)))


@pytest.mark.parametrize(
    "dropouts, included",
    [
        (Dropouts(before_share_keys=frozenset({1})), [0, 2, 3, 4, 5]),
        (Dropouts(before_masked_input=frozenset({2, 5})), [0, 1, 3, 4]),  # dangling pairwise masks removed
        (Dropouts(before_unmasking=frozenset({0, 3})), [0, 1, 2, 3, 4, 5]),  # late dropouts stay in the sum
        (Dropouts(frozenset({1}), frozenset({2}), frozenset({4})), [0, 3, 4, 5]),
    ],
)
def test_recovery_with_dropouts_up_to_the_threshold(dropouts, included):
    inputs = ring_inputs(6, 64, seed=3)
    result = secure_sum(inputs, threshold=3, modulus_bits=BITS, dropouts=dropouts)
    assert result.included == included
    assert np.array_equal(result.total, plain_sum(inputs, included))


@pytest.mark.parametrize(
    "dropouts",
    [
        Dropouts(before_share_keys=frozenset({0, 1, 2})),
        Dropouts(before_masked_input=frozenset({0, 1, 2})),
        Dropouts(before_unmasking=frozenset({3, 4, 5})),
        Dropouts(frozenset({0}), frozenset({1}), frozenset({2, 3})),
    ],
)
def test_round_fails_cleanly_past_the_threshold(dropouts):
    inputs = ring_inputs(6, 16, seed=4)
    with pytest.raises(SecureAggregationError, match="fewer than the threshold 4|threshold is 4"):
        secure_sum(inputs, threshold=4, modulus_bits=BITS, dropouts=dropouts)


def test_a_client_never_reveals_both_secrets_of_another():
    inputs = ring_inputs(4, 8)
    clients = {u: SecAggClient(u, inputs[u], 2, BITS) for u in inputs}
    server = SecAggServer(2, 8, BITS)
    roster = server.receive_keys({u: c.advertise_keys() for u, c in clients.items()})
    inboxes = server.route_shares({u: c.share_keys(roster) for u, c in clients.items()})
    for u in clients:
        clients[u].masked_input(inboxes[u])
    first = clients[0].unmasking_shares([0, 1, 2, 3])
    assert {kind for kind, _ in first.values()} == {"b"}
    with pytest.raises(SecureAggregationError, match="asked twice"):  # a curious server asks again claiming 3 dropped
        clients[0].unmasking_shares([0, 1, 2])


def test_quantized_sum_is_exact_up_to_quantization():
    quantizer = Quantizer(clip_range=8.0, levels=2**20, modulus_bits=BITS)
    generator = torch.Generator().manual_seed(0)
    vectors = {u: torch.randn(500, generator=generator) for u in range(4)}
    integers = {u: quantizer.to_integers(v, generator) for u, v in vectors.items()}
    result = secure_sum({u: quantizer.to_ring(i) for u, i in integers.items()}, threshold=3, modulus_bits=BITS)
    decoded = quantizer.decode_sum(result.total, len(result.included))
    assert torch.equal(decoded, quantizer.dequantize(sum(integers.values())))  # exact
    assert float((decoded - sum(vectors.values()).double()).abs().max()) <= 4 * 8.0 / 2**20  # within n quantisation steps
    with pytest.raises(ValueError, match="overflow"):
        quantizer.decode_sum(result.total, quantizer.max_clients() + 1)


def test_stochastic_rounding_is_unbiased():
    quantizer = Quantizer(clip_range=1.0, levels=4, modulus_bits=16)
    generator = torch.Generator().manual_seed(0)
    value = torch.full((40000,), 0.3)  # 0.3 * 4 = 1.2 levels: 1 with prob 0.8, 2 with prob 0.2
    integers = quantizer.to_integers(value, generator)
    assert set(np.unique(integers)) == {1, 2}
    assert float(quantizer.dequantize(integers).mean()) == pytest.approx(0.3, abs=0.005)


def test_traffic_is_counted_per_round():
    inputs = ring_inputs(4, 100)
    result = secure_sum(inputs, threshold=2, modulus_bits=BITS, dropouts=Dropouts(before_masked_input=frozenset({3})))
    phases = {p.phase: p for p in result.traffic}
    assert phases["advertise_keys"].messages_up == 4 and phases["advertise_keys"].bytes_up == 4 * 68
    assert phases["share_keys"].messages_up == 4
    assert phases["masked_input"].messages_up == 3 and phases["masked_input"].bytes_up == 3 * (4 + 100 * 4)
    assert phases["unmasking"].messages_up == 3
    assert result.bytes_total == sum(p.bytes_up + p.bytes_down for p in result.traffic) > 3 * 400


def test_float_sum_with_client_side_clipping_composes_with_dp():
    from atoll.privacy.dp.clipping import clip_to_norm
    from atoll.privacy.secagg.float_sum import secure_float_sum

    quantizer = Quantizer(clip_range=2.0, levels=2**16, modulus_bits=BITS)
    generator = torch.Generator().manual_seed(5)
    updates = {u: torch.randn(64, generator=generator) * (u + 1) for u in range(5)}
    result = secure_float_sum(updates, quantizer, threshold=3, dropouts=Dropouts(before_masked_input=frozenset({4})), clip_norm=1.0)
    expected = sum(quantizer.dequantize(quantizer.to_integers(clip_to_norm(updates[u].double(), 1.0))) for u in range(4))
    assert torch.equal(result.total, expected)
    assert result.protocol.included == [0, 1, 2, 3]
    with pytest.raises(SecureAggregationError, match="overflow"):
        secure_float_sum({u: torch.zeros(2) for u in range(10)}, Quantizer(1.0, 2**28, 32), threshold=2)
