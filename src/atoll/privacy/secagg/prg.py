"""A pseudorandom generator expanding a 32-byte seed into a mask vector in Z_R.

Bonawitz et al. (CCS 2017) expand agreed seeds with a PRG so that masks as long as the model cost
32 bytes to agree on. Here the PRG is the ChaCha20 keystream (RFC 8439, from ``cryptography``)
under the seed as key; its bytes, read as little-endian words and reduced mod R = 2^bits (a power
of two, so the reduction keeps them uniform), are the mask.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_NONCE = bytes(16)  # each seed is used for exactly one mask, so a fixed nonce is safe


def expand_mask(seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """``length`` uniform elements of Z_(2^modulus_bits) (uint64) derived from ``seed``."""
    if len(seed) != 32:
        raise ValueError("PRG seeds are 32 bytes")
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * length))
    words = np.frombuffer(stream, dtype="<u8").copy()
    if modulus_bits < 64:
        words &= np.uint64((1 << modulus_bits) - 1)
    return words
