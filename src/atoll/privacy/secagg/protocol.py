"""Bonawitz et al.'s secure aggregation for the semi-honest setting, with dropout recovery.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal, Seth, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning", CCS 2017 (the honest-but-curious protocol
of their Fig. 4, without signatures and the consistency-check round, which only an active
adversary needs). Four rounds between n clients and the server:

0. AdvertiseKeys: each client u draws two X25519 key pairs (c for a private channel, s for
   masking) and sends both public keys; the server broadcasts the list U1.
1. ShareKeys: u draws a self-mask seed b_u, Shamir-shares b_u and its s private key with
   threshold t among U1, and sends each share to its holder v encrypted under AES-GCM with a key
   derived (HKDF) from the c agreement of u and v; the server only routes ciphertexts (U2).
2. MaskedInputCollection: u sends y_u = x_u + PRG(b_u) + Σ_{v∈U2, u<v} PRG(s_uv)
   − Σ_{v∈U2, u>v} PRG(s_uv) mod R, with s_uv = HKDF(X25519(s_u, s_v)) (U3: who sent).
3. Unmasking: each surviving v reveals, for every other u ∈ U2, the share of b_u if u ∈ U3 and
   the share of u's s key if u dropped, never both. With t shares the server rebuilds b_u for the
   survivors and the s key of each dropped client, removes their masks, and gets Σ_{u∈U3} x_u.

Pairwise masks hide each upload from the server; self masks (double masking) keep a late
dropout's input hidden even after its pairwise masks are removed. Any step where fewer than t
clients remain fails the whole round with :class:`SecureAggregationError`; nothing partial leaks.
Traffic (messages and bytes up and down per round) is counted from the real message sizes, so a
simulation can charge it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from atoll.privacy.errors import SecureAggregationError
from atoll.privacy.secagg import shamir
from atoll.privacy.secagg.prg import expand_mask

PHASES = ("advertise_keys", "share_keys", "masked_input", "unmasking")
_ID = struct.Struct(">I")
_KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def agree(private: X25519PrivateKey, public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key from an X25519 agreement, derived with HKDF-SHA256 for one ``purpose``."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=b"atoll-secagg " + purpose).derive(shared)


def _pair_sign(u: int, v: int) -> int:
    return 1 if u < v else -1


@dataclass
class PhaseTraffic:
    """Messages and bytes of one protocol round, client-to-server (up) and server-to-client (down)."""

    phase: str
    messages_up: int = 0
    bytes_up: int = 0
    messages_down: int = 0
    bytes_down: int = 0


@dataclass
class SecAggResult:
    """The unmasked sum in Z_R, whose inputs it holds, and the traffic of each round."""

    total: np.ndarray
    included: list[int]
    dropped: list[int]
    traffic: list[PhaseTraffic] = field(default_factory=list)

    @property
    def bytes_total(self) -> int:
        return sum(p.bytes_up + p.bytes_down for p in self.traffic)


class SecAggClient:
    """One client's side of the protocol, holding its input x_u (already in Z_R)."""

    def __init__(self, client_id: int, ring_input: np.ndarray, threshold: int, modulus_bits: int):
        self.client_id = client_id
        self.point = client_id + 1  # Shamir evaluation point, never 0
        self.input = ring_input.astype(np.uint64)
        self.threshold = threshold
        self.modulus_bits = modulus_bits
        self._mask = np.uint64((1 << modulus_bits) - 1) if modulus_bits < 64 else None
        self._channel_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = os.urandom(_KEY_BYTES)
        self._roster: dict[int, tuple[bytes, bytes]] = {}
        self._inbox: dict[int, bytes] = {}
        self._own_shares: tuple[int, int] | None = None
        self._revealed_masks_for: set[int] | None = None

    def _reduce(self, values: np.ndarray) -> np.ndarray:
        return values & self._mask if self._mask is not None else values

    # round 0
    def advertise_keys(self) -> tuple[bytes, bytes]:
        return _raw_public(self._channel_key), _raw_public(self._mask_key)

    # round 1
    def share_keys(self, roster: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Encrypted shares of b_u and of the s private key for every other client of U1."""
        if len(roster) < self.threshold:
            raise SecureAggregationError(f"only {len(roster)} clients advertised keys, the threshold is {self.threshold}")
        if len({keys for keys in roster.values()}) != len(roster):
            raise SecureAggregationError("two clients advertised the same keys", "every client must draw its own key pairs")
        self._roster = dict(roster)
        points = [v + 1 for v in roster]
        seed_shares = shamir.split(self._self_seed, self.threshold, points)
        key_shares = shamir.split(_raw_private(self._mask_key), self.threshold, points)
        self._own_shares = (seed_shares[self.point], key_shares[self.point])
        outgoing: dict[int, bytes] = {}
        for v, (channel_public, _) in roster.items():
            if v == self.client_id:
                continue
            plaintext = (
                _ID.pack(self.client_id) + _ID.pack(v) + shamir.encode_share(seed_shares[v + 1]) + shamir.encode_share(key_shares[v + 1])
            )
            nonce = os.urandom(_NONCE_BYTES)
            outgoing[v] = nonce + AESGCM(agree(self._channel_key, channel_public, b"channel")).encrypt(nonce, plaintext, None)
        return outgoing

    # round 2
    def masked_input(self, inbox: dict[int, bytes]) -> np.ndarray:
        """y_u = x_u + PRG(b_u) ± PRG(s_uv) for every other v of U2 (those whose shares arrived)."""
        if len(inbox) + 1 < self.threshold:
            raise SecureAggregationError(f"only {len(inbox) + 1} clients shared keys, the threshold is {self.threshold}")
        self._inbox = dict(inbox)
        length = self.input.size
        masked = self.input + expand_mask(self._self_seed, length, self.modulus_bits)
        for v in inbox:
            seed = agree(self._mask_key, self._roster[v][1], b"mask")
            pairwise = expand_mask(seed, length, self.modulus_bits)
            masked = masked + pairwise if _pair_sign(self.client_id, v) > 0 else masked - pairwise
        return self._reduce(masked)

    # round 3
    def unmasking_shares(self, included: list[int]) -> dict[int, tuple[str, bytes]]:
        """For each u of U2: the share of b_u if u's masked input arrived, else of u's s key."""
        included_set = set(included)
        if len(included_set) < self.threshold:
            raise SecureAggregationError(f"only {len(included_set)} masked inputs arrived, the threshold is {self.threshold}")
        if not included_set <= set(self._inbox) | {self.client_id}:
            raise SecureAggregationError("the server named clients that never shared keys", "the round is aborted")
        if self._revealed_masks_for is not None and self._revealed_masks_for != included_set:
            raise SecureAggregationError("the server asked twice with different survivor lists", "the round is aborted")
        self._revealed_masks_for = included_set
        response: dict[int, tuple[str, bytes]] = {}
        for u, ciphertext in self._inbox.items():
            key = agree(self._channel_key, self._roster[u][0], b"channel")
            plaintext = AESGCM(key).decrypt(ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:], None)
            sender, receiver = _ID.unpack(plaintext[:4])[0], _ID.unpack(plaintext[4:8])[0]
            if (sender, receiver) != (u, self.client_id):
                raise SecureAggregationError(f"a share from client {u} was addressed wrongly", "the round is aborted")
            seed_share = plaintext[8 : 8 + shamir.SHARE_BYTES]
            key_share = plaintext[8 + shamir.SHARE_BYTES :]
            response[u] = ("b", seed_share) if u in included_set else ("s", key_share)
        if self.client_id in included_set and self._own_shares is not None:
            response[self.client_id] = ("b", shamir.encode_share(self._own_shares[0]))
        return response


class SecAggServer:
    """The server's side: routes messages, checks the threshold at every step, unmasks the sum."""

    def __init__(self, threshold: int, length: int, modulus_bits: int):
        self.threshold = threshold
        self.length = length
        self.modulus_bits = modulus_bits
        self._mask = np.uint64((1 << modulus_bits) - 1) if modulus_bits < 64 else None
        self.traffic = {phase: PhaseTraffic(phase) for phase in PHASES}
        self._roster: dict[int, tuple[bytes, bytes]] = {}
        self._sharers: list[int] = []
        self._masked: dict[int, np.ndarray] = {}

    def _require(self, count: int, what: str) -> None:
        if count < self.threshold:
            raise SecureAggregationError(
                f"only {count} clients {what}, fewer than the threshold {self.threshold}; the round is dropped",
                "lower the threshold or expect fewer dropouts",
            )

    def receive_keys(self, adverts: dict[int, tuple[bytes, bytes]]) -> dict[int, tuple[bytes, bytes]]:
        traffic = self.traffic["advertise_keys"]
        traffic.messages_up += len(adverts)
        traffic.bytes_up += len(adverts) * (_ID.size + 2 * _KEY_BYTES)
        self._require(len(adverts), "advertised keys")
        self._roster = dict(adverts)
        traffic.messages_down += len(adverts)
        traffic.bytes_down += len(adverts) * len(adverts) * (_ID.size + 2 * _KEY_BYTES)
        return dict(self._roster)

    def route_shares(self, outgoing: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Forward each encrypted share to its holder; U2 is who sent shares."""
        traffic = self.traffic["share_keys"]
        traffic.messages_up += len(outgoing)
        traffic.bytes_up += sum(len(c) + 2 * _ID.size for shares in outgoing.values() for c in shares.values())
        self._require(len(outgoing), "shared their keys")
        self._sharers = sorted(outgoing)
        inboxes: dict[int, dict[int, bytes]] = {v: {} for v in self._sharers}
        for u, shares in outgoing.items():
            for v, ciphertext in shares.items():
                if v in inboxes:
                    inboxes[v][u] = ciphertext
        traffic.messages_down += len(inboxes)
        traffic.bytes_down += sum(len(c) + _ID.size for inbox in inboxes.values() for c in inbox.values())
        return inboxes

    def receive_masked(self, masked: dict[int, np.ndarray]) -> list[int]:
        """Collect y_u; U3 (the clients whose inputs will be in the sum) is who sent one."""
        traffic = self.traffic["masked_input"]
        value_bytes = (self.modulus_bits + 7) // 8
        traffic.messages_up += len(masked)
        traffic.bytes_up += len(masked) * (_ID.size + self.length * value_bytes)
        for u, vector in masked.items():
            if u not in self._sharers or vector.shape != (self.length,):
                raise SecureAggregationError(f"client {u} sent a masked input out of protocol", "the round is aborted")
        self._require(len(masked), "sent masked inputs")
        self._masked = dict(masked)
        included = sorted(masked)
        unmask = self.traffic["unmasking"]
        unmask.messages_down += len(included)
        unmask.bytes_down += len(included) * _ID.size * len(included)
        return included

    def unmask(self, responses: dict[int, dict[int, tuple[str, bytes]]]) -> np.ndarray:
        """Rebuild the self-mask seeds of U3 and the s keys of U2 \\ U3, remove every mask."""
        traffic = self.traffic["unmasking"]
        traffic.messages_up += len(responses)
        traffic.bytes_up += sum(_ID.size + len(r) * (_ID.size + 1 + shamir.SHARE_BYTES) for r in responses.values())
        self._require(len(responses), "answered the unmasking request")
        included = sorted(self._masked)
        dropped = [u for u in self._sharers if u not in self._masked]
        shares: dict[int, dict[int, int]] = {u: {} for u in self._sharers}
        for holder, response in responses.items():
            for u, (kind, share) in response.items():
                expected = "b" if u in self._masked else "s"
                if kind != expected:
                    raise SecureAggregationError(f"client {holder} revealed the wrong secret of client {u}", "the round is aborted")
                shares[u][holder + 1] = shamir.decode_share(share)
        total = np.zeros(self.length, dtype=np.uint64)
        for u in included:
            total = total + self._masked[u]
        for u in included:
            seed = self._reconstruct(shares[u], u, "self-mask seed")
            total = total - expand_mask(seed, self.length, self.modulus_bits)
        for u in dropped:
            private = X25519PrivateKey.from_private_bytes(self._reconstruct(shares[u], u, "masking key"))
            for v in included:
                pairwise = expand_mask(agree(private, self._roster[v][1], b"mask"), self.length, self.modulus_bits)
                # v added sign(v, u) * PRG(s_vu); the dropped u never sent its opposite term
                total = total - pairwise if _pair_sign(v, u) > 0 else total + pairwise
        return total & self._mask if self._mask is not None else total

    def _reconstruct(self, shares: dict[int, int], u: int, what: str) -> bytes:
        if len(shares) < self.threshold:
            raise SecureAggregationError(
                f"only {len(shares)} shares of client {u}'s {what} arrived, fewer than the threshold {self.threshold}",
                "lower the threshold or expect fewer dropouts",
            )
        chosen = dict(sorted(shares.items())[: self.threshold])
        return shamir.combine(chosen, _KEY_BYTES)


@dataclass(frozen=True)
class Dropouts:
    """Clients that vanish at each step of the protocol (after doing the step before it)."""

    before_share_keys: frozenset[int] = frozenset()
    before_masked_input: frozenset[int] = frozenset()
    before_unmasking: frozenset[int] = frozenset()


def secure_sum(inputs: dict[int, np.ndarray], threshold: int, modulus_bits: int, dropouts: Dropouts = Dropouts()) -> SecAggResult:
    """Run the four rounds in one process between a server and one client object per input.

    ``inputs`` maps client id to its vector in Z_R. The result's sum covers exactly the clients
    whose masked input reached the server; it raises :class:`SecureAggregationError` when fewer
    than ``threshold`` clients remain at any step.
    """
    if not inputs:
        raise SecureAggregationError("no client takes part in secure aggregation")
    lengths = {vector.size for vector in inputs.values()}
    if len(lengths) != 1:
        raise SecureAggregationError("clients' vectors differ in length", "every client must upload the same parameters")
    length = lengths.pop()
    clients = {u: SecAggClient(u, vector, threshold, modulus_bits) for u, vector in inputs.items()}
    server = SecAggServer(threshold, length, modulus_bits)
    roster = server.receive_keys({u: client.advertise_keys() for u, client in clients.items()})
    alive = [u for u in roster if u not in dropouts.before_share_keys]
    inboxes = server.route_shares({u: clients[u].share_keys(roster) for u in alive})
    alive = [u for u in inboxes if u not in dropouts.before_masked_input]
    included = server.receive_masked({u: clients[u].masked_input(inboxes[u]) for u in alive})
    alive = [u for u in included if u not in dropouts.before_unmasking]
    total = server.unmask({u: clients[u].unmasking_shares(included) for u in alive})
    dropped = sorted(set(inputs) - set(included))
    return SecAggResult(total, included, dropped, [server.traffic[phase] for phase in PHASES])


_SHARE_CIPHERTEXT = _NONCE_BYTES + 2 * _ID.size + 2 * shamir.SHARE_BYTES + _TAG_BYTES


@dataclass(frozen=True)
class ClientTraffic:
    """What one client sends and receives in a round of ``participants`` (no dropouts), counted
    as :class:`SecAggServer` counts it: the masked input apart, as it stands in for the upload."""

    bytes_up: int  # keys, encrypted shares and unmasking shares
    masked_input_bytes: int
    bytes_down: int  # roster, forwarded shares, survivor list
    round_trips: int  # protocol rounds besides the masked upload itself


def client_traffic(participants: int, length: int, modulus_bits: int) -> ClientTraffic:
    """Per-client traffic of :func:`secure_sum` among ``participants`` clients, vectors of ``length``."""
    others = participants - 1
    value_bytes = (modulus_bits + 7) // 8
    up = (_ID.size + 2 * _KEY_BYTES) + others * (_SHARE_CIPHERTEXT + 2 * _ID.size)
    up += _ID.size + participants * (_ID.size + 1 + shamir.SHARE_BYTES)
    down = participants * (_ID.size + 2 * _KEY_BYTES) + others * (_SHARE_CIPHERTEXT + _ID.size) + participants * _ID.size
    return ClientTraffic(up, _ID.size + length * value_bytes, down, 3)
