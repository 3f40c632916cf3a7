"""Label flipping: a malicious client trains on its own data with labels remapped.

Threat model: the attacker controls its clients' training data (not the protocol or the code); it
trains honestly on poisoned labels. Tolpegin, Truex, Gursoy, Liu, "Data Poisoning Attacks Against
Federated Learning Systems", ESORICS 2020 (source class → target class); the all-classes variant
maps c → C − 1 − c.
"""

from __future__ import annotations

import numpy as np


def flip_labels(labels: np.ndarray, num_classes: int, source: int | None = None, target: int | None = None) -> np.ndarray:
    """Labels with ``source`` relabelled ``target``, or with every c mapped to C − 1 − c when no source is given."""
    labels = np.asarray(labels)
    if source is None:
        return (num_classes - 1 - labels).astype(labels.dtype)
    if target is None or not (0 <= source < num_classes and 0 <= target < num_classes):
        raise ValueError("label flipping needs source and target classes inside [0, num_classes)")
    flipped = labels.copy()
    flipped[labels == source] = target
    return flipped
