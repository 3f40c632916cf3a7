"""Shamir's t-out-of-n secret sharing over the prime field GF(2^521 − 1).

Shamir, "How to Share a Secret", CACM 1979. A secret s becomes the constant term of a random
polynomial f of degree t − 1; share i is (i, f(i)). Any t shares give s back by Lagrange
interpolation at 0; fewer reveal nothing about it. Secure aggregation shares 32-byte secrets
(mask seeds and X25519 private keys), which fit below the Mersenne prime 2^521 − 1.
"""

from __future__ import annotations

import secrets

PRIME = 2**521 - 1
SHARE_BYTES = 66  # a field element, big-endian


def split(secret: bytes, threshold: int, holders: list[int]) -> dict[int, int]:
    """Shares of ``secret`` for each holder id (ids are the evaluation points, all nonzero)."""
    if threshold < 1 or threshold > len(holders):
        raise ValueError(f"threshold {threshold} must be in [1, {len(holders)}]")
    if any(h <= 0 or h >= PRIME for h in holders) or len(set(holders)) != len(holders):
        raise ValueError("holder ids must be distinct positive integers")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError("secret is too large for the field")
    coefficients = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for holder in holders:
        result = 0
        for coefficient in reversed(coefficients):  # Horner's rule
            result = (result * holder + coefficient) % PRIME
        shares[holder] = result
    return shares


def combine(shares: dict[int, int], length: int) -> bytes:
    """The secret of ``length`` bytes from shares {id: f(id)} (needs at least the threshold)."""
    if not shares:
        raise ValueError("no shares to combine")
    secret = 0
    for i, y_i in shares.items():
        numerator, denominator = 1, 1
        for j in shares:
            if j != i:
                numerator = numerator * (-j) % PRIME
                denominator = denominator * (i - j) % PRIME
        secret = (secret + y_i * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 256**length:
        raise ValueError("these shares do not determine a secret of that length (fewer than the threshold, or corrupt)")
    return secret.to_bytes(length, "big")


def encode_share(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    return int.from_bytes(data, "big")
