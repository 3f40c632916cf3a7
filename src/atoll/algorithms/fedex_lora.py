"""FedEx-LoRA: FedAvg of the factors plus the exact residual merged into the base (Singhal,
Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", ACL 2025).

Server, with one set of weights p_k = n_k / sum n used everywhere:
    A_bar = sum_k p_k A_k,   B_bar = sum_k p_k B_k,   head = sum_k p_k head_k,
    R = sum_k p_k B_k A_k - B_bar A_bar,              W0' = W0 + s R   (cumulative, in base).
Then W0' + s B_bar A_bar = W0 + sum_k p_k s B_k A_k: the global model is exactly the weighted
average of the clients' models. sum_k p_k B_k A_k is one product of the stacked factors.

Downlink: the LoRA factors, the head and the dense merged base (a client keeps no model copy),
so every download costs a dense d x k tensor per adapted module; ``bytes_down`` counts it.

mixed_ranks "refuse": the residual needs one shared scale s. not asynchronous: the
residual is defined for a synchronous weighted average of one round's updates.
"""

from __future__ import annotations

from atoll.algorithms.catalog import SPECS
from atoll.algorithms._lowrank import stack
from atoll.fl.base import BaseClient, BaseServer, weighted_average
from atoll.fl.state import AdapterState, LoRAFactors, Update, example_weights


class FedExLoRAClient(BaseClient):
    def upload(self, round: int, start: AdapterState, trained: AdapterState) -> AdapterState:
        return AdapterState(trained.lora, trained.extra)  # the base is the server's; never sent back


class FedExLoRA(BaseServer):
    spec = SPECS["fedex-lora"]
    client_class = FedExLoRAClient

    def aggregate(self, round: int, updates: list[Update]) -> None:
        if not updates:
            return
        weights = example_weights(updates)
        lora: dict[str, LoRAFactors] = {}
        base = dict(self.global_state.base)
        for name, current in self.global_state.lora.items():
            factors = [u.state.lora[name] for u in updates]
            A_bar = weighted_average([f.A for f in factors], weights)
            B_bar = weighted_average([f.B for f in factors], weights)
            B_stack, A_stack = stack(factors, weights)  # B_stack A_stack = sum_k p_k s_k B_k A_k
            residual = B_stack @ A_stack - current.scale * (B_bar.float() @ A_bar.float())
            base[name] = residual if name not in base else base[name] + residual
            lora[name] = LoRAFactors(A_bar, B_bar, current.scale)
        extra = {name: weighted_average([u.state.extra[name] for u in updates], weights) for name in self.global_state.extra}
        self.global_state = AdapterState(lora, extra, base)
