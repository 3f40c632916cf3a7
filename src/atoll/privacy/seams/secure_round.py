"""One round of Bonawitz et al.'s secure aggregation among the clients of a federation round.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017
(:mod:`atoll.privacy.secagg.protocol`). Each client's input is its weighted change w_k·Δ_k with the
weight w_k appended (DP: the clipped change with weight 1), quantized into Z_(2^bits); the server
learns only Σ w_k·Δ_k and Σ w_k over the clients whose masked input arrived. A seeded fraction of
the round's clients drops after sharing keys (``privacy.secagg.dropout``): their masks are
recovered from the survivors' shares. Fewer survivors than the threshold fail the round as a
whole (:class:`~atoll.privacy.errors.SecureAggregationError`): nothing of it is released.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from atoll.privacy.secagg.protocol import Dropouts, client_traffic, secure_sum
from atoll.privacy.secagg.quantize import Quantizer
from atoll.seeding import derive_seed, numpy_rng


@dataclass
class SecureRoundResult:
    total: Tensor  # Σ over included clients of their input (float64)
    included: list[int]
    dropped: list[int]
    bytes_up: int
    bytes_down: int
    clamped: int  # input values outside [-clip_range, clip_range], cut by the quantizer


class SecureRound:
    """Secure sums of float vectors for one run (settings: ``privacy.secagg``)."""

    def __init__(self, settings, threshold_of, seed: int):
        self.settings = settings
        self.threshold_of = threshold_of  # participants -> threshold t
        self.seed = seed
        self.quantizer = Quantizer(settings.clip_range, settings.levels, settings.modulus_bits)

    def dropouts(self, round: int, participants: list[int]) -> Dropouts:
        """The seeded clients that vanish after sharing keys (before sending their masked input)."""
        count = int(round_half_up(self.settings.dropout * len(participants)))
        if count == 0:
            return Dropouts()
        chosen = numpy_rng(self.seed, "secagg-dropout", round).choice(sorted(participants), size=count, replace=False)
        return Dropouts(before_masked_input=frozenset(int(c) for c in chosen))

    def run(self, round: int, inputs: dict[int, Tensor]) -> SecureRoundResult:
        """Σ of the inputs of the clients that stay to the end (raises SecureAggregationError below the threshold)."""
        participants = sorted(inputs)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "secagg-rounding", round))
        clip = self.settings.clip_range
        clamped = sum(int((vector.abs() > clip).sum()) for vector in inputs.values())
        encoded = {c: self.quantizer.encode(inputs[c].reshape(-1), generator) for c in participants}
        result = secure_sum(encoded, self.threshold_of(len(participants)), self.quantizer.modulus_bits, self.dropouts(round, participants))
        total = self.quantizer.decode_sum(result.total, len(result.included))
        return SecureRoundResult(
            total,
            result.included,
            result.dropped,
            sum(p.bytes_up for p in result.traffic),
            sum(p.bytes_down for p in result.traffic),
            clamped,
        )

    def client_cost(self, participants: int, length: int, plain_bytes: int) -> tuple[int, int]:
        """(extra upload bytes, extra round trips) of one client: keys, shares and unmasking, plus
        the masked input's size over the raw bytes of the tensors it stands in for (``plain_bytes``)."""
        traffic = client_traffic(participants, length, self.quantizer.modulus_bits)
        return traffic.bytes_up + traffic.masked_input_bytes - plain_bytes, traffic.round_trips


def round_half_up(value: float) -> int:
    return int(np.floor(value + 0.5))
