"""Client-level differential privacy for federated averaging (DP-FedAvg).

McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language Models",
ICLR 2018. Each round samples clients with probability q; each client's update Δ_k is clipped to
L2 norm S; the server adds N(0, z²S²I) to the sum and divides by the *expected* number of sampled
clients qN, a fixed denominator. Dividing by the actual count would make the denominator depend on
who took part, so the sensitivity of the average would no longer be S / (qN). Every client weighs
the same: weighting by example counts would let one client's weight, and so the sensitivity, grow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from atoll.privacy.dp.adaptive_clipping import AdaptiveClipBound, update_noise_multiplier
from atoll.privacy.dp.clipping import clip_to_norm, l2_norm


@dataclass
class NoisyMean:
    """The private mean and what the server may log about it (the norms are not private)."""

    mean: Tensor
    clipped: int
    noise_stddev: float


def dp_fedavg_mean(
    updates: list[Tensor],
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator | None = None,
) -> NoisyMean:
    """(Σ clip(Δ_k, S) + N(0, z²S²I)) / (qN) over flat float updates of one round.

    ``expected_clients`` is qN (the fixed denominator). With no update the result is pure noise
    over qN, as the mechanism requires (an empty round must not look different in expectation).
    """
    if expected_clients <= 0:
        raise ValueError("expected_clients (q * N) must be > 0")
    if not updates:
        raise ValueError("dp_fedavg_mean needs at least one update to know the vector size")
    total = torch.zeros(updates[0].numel(), dtype=torch.float64)
    clipped = 0
    for update in updates:
        flat = update.reshape(-1).to(torch.float64)
        clipped += int(l2_norm(flat) > clip_norm)
        total += clip_to_norm(flat, clip_norm)
    stddev = noise_multiplier * clip_norm
    if stddev > 0:
        total += torch.normal(0.0, stddev, total.shape, generator=generator, dtype=torch.float64)
    return NoisyMean(total / expected_clients, clipped, stddev / expected_clients)


class AdaptiveDPFedAvg:
    """DP-FedAvg with the clipping bound adapted each round (Andrew et al., NeurIPS 2021).

    A round clips to the current C, adds noise z_Δ·C to the sum (z_Δ from the noise split that
    keeps the round's privacy at noise multiplier z), then moves C with the noisy clipped count.
    """

    def __init__(self, clip: AdaptiveClipBound, noise_multiplier: float):
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.update_noise_multiplier = update_noise_multiplier(noise_multiplier, clip.count_noise_stddev)

    def aggregate(self, updates: list[Tensor], expected_clients: float, generator: torch.Generator | None = None) -> NoisyMean:
        bound = self.clip.bound
        result = dp_fedavg_mean(updates, bound, self.update_noise_multiplier, expected_clients, generator)
        self.clip.update([l2_norm(u) for u in updates], expected_clients, generator)
        return result
