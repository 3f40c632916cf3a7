"""FedIT: FedAvg on LoRA factors (Zhang et al., "Towards Building the Next-Generation of Federated
GPT: Federated Instruction Tuning", ICASSP 2024).

Server: A <- sum_k p_k A_k, B <- sum_k p_k B_k, head <- sum_k p_k head_k with p_k = n_k / sum n.
Inexact by design: s * mean(B) mean(A) differs from mean(s B_k A_k) when both factors vary.
"""

from __future__ import annotations

from atoll.algorithms.catalog import SPECS
from atoll.fl.base import BaseServer


class FedIT(BaseServer):
    spec = SPECS["fedit"]
