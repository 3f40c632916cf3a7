"""Which clients are attackers: listed ids, or a seeded random fraction of the federation."""

from __future__ import annotations

import numpy as np

from atoll.errors import ConfigError


def choose_attackers(num_clients: int, fraction: float = 0.0, ids: list[int] | None = None, seed: int = 0) -> list[int]:
    """Attacker ids: ``ids`` when given, else round(fraction · n) clients drawn with ``seed``."""
    if ids:
        bad = [i for i in ids if not 0 <= i < num_clients]
        if bad:
            raise ConfigError(f"attacker ids {bad} are not clients of a federation of {num_clients}", f"use ids in 0..{num_clients - 1}")
        return sorted(set(ids))
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"attacker fraction {fraction} is outside [0, 1]", "set a fraction between 0 and 1")
    count = int(round(fraction * num_clients))
    rng = np.random.default_rng([seed, 0xA77AC])
    return sorted(int(i) for i in rng.choice(num_clients, size=count, replace=False))
