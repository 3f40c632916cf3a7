"""SCAFFOLD: control variates against client drift (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh,
"SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML 2020).

Server state: adapter x and control variate c; client i keeps its own variate c_i (zero at first).
Client: start at y = x and take K local steps on the corrected gradient g(y) + c - c_i. Then
  option II:  c_i+ = c_i - c + (x - y_i) / (sum of the K step sizes)   (= K * lr for a constant LR)
  option I:   c_i+ = g_i(x), the raw gradient of the first local step (taken at y = x).
Upload y_i and dc_i = c_i+ - c_i. Server, with p_k = n_k / sum n over the sampled set S:
  x <- x + eta_g * sum_k p_k (y_k - x),    c <- c + (1/N) * sum_{k in S} dc_k  (= |S|/N * mean dc),
so c stays the mean of all N clients' c_i. With c = c_i = 0 (round 1) a client trains exactly as in
FedIT, and eta_g = 1 makes the server step FedIT's weighted average.

Our local optimizer is AdamW, not SGD. The correction is added to the accumulated gradient in
``TrainHooks.after_backward``, i.e. before gradient clipping and before AdamW's moments see it, so
AdamW normalises the corrected gradient per coordinate. Option II then estimates c_i from the AdamW
displacement divided by the step sizes: that has the units of AdamW's normalised direction (about
one per coordinate), not of a raw gradient, so the correction c - c_i and the raw gradient can
differ in scale. Option I keeps both in gradient units (at the cost of a one-batch estimate).
Weight decay and clipping are part of the displacement option II sees. Measured on MiniLM (lr 2e-3,
5 local steps, 4 clients): with option II the correction's norm was about 150x the gradient's,
so corrected steps follow c - c_i almost alone (final accuracy 0.80 vs FedIT's 1.00); with
option I it was about 0.8x (accuracy 1.00, loss 0.31 vs FedIT's 0.35). So option I is the
default here (the paper suggests option II for SGD). On the comparison task (docs/algorithms.md,
3 seeds): IID global accuracy 0.568 +- 0.019 with option I against 0.508 +- 0.045 with option II
(FedIT 0.562); Dirichlet(0.1) 0.488 +- 0.063 against 0.398 +- 0.042.
"""

from __future__ import annotations


import torch
from torch import Tensor, nn

from atoll.algorithms.catalog import SPECS
from atoll.errors import UpdateError
from atoll.fl.base import BaseClient, BaseServer, average_states
from atoll.fl.state import AdapterState, Update, example_weights
from atoll.fl.trainer import TrainHooks, lr_factor
from atoll.fl.workbench import Trainable
from atoll.models.adapters import LiveAdapter

CONTROL = "scaffold.c."  # server variate c, sent down as control data
CONTROL_DELTA = "scaffold.dc."  # dc_i = c_i+ - c_i, sent up as control data


def variate_tensors(state: AdapterState, trainable: Trainable = Trainable()) -> dict[str, Tensor]:
    """The tensors that carry a control variate, keyed like ``AdapterState.to_tensors`` (the model
    part: factors and other trainable tensors; no scales, no control data)."""
    tensors: dict[str, Tensor] = {}
    for name, factors in state.lora.items():
        if trainable.lora_A:
            tensors[f"lora.{name}.A"] = factors.A
        if trainable.lora_B:
            tensors[f"lora.{name}.B"] = factors.B
    if trainable.extra:
        for name, tensor in state.extra.items():
            tensors[f"extra.{name}"] = tensor
    return tensors


def variate_handles(live: LiveAdapter, trainable: Trainable) -> dict[str, nn.Parameter]:
    """Live parameters keyed like :func:`variate_tensors`."""
    handles: dict[str, nn.Parameter] = {}
    for name, (a, b, _) in live.lora.items():
        if trainable.lora_A:
            handles[f"lora.{name}.A"] = a
        if trainable.lora_B:
            handles[f"lora.{name}.B"] = b
    if trainable.extra:
        for name, param in live.extra.items():
            handles[f"extra.{name}"] = param
    return handles


def with_control(state: AdapterState, prefix: str, tensors: dict[str, Tensor]) -> AdapterState:
    """``state`` plus ``tensors`` as control data named ``prefix + key`` (shares tensors, copies nothing)."""
    control = dict(state.control)
    control.update({prefix + key: tensor for key, tensor in tensors.items()})
    return AdapterState(dict(state.lora), dict(state.extra), dict(state.base), control)


def control_of(state: AdapterState, prefix: str) -> dict[str, Tensor]:
    """The control tensors named ``prefix + key``, keyed by ``key``."""
    return {name[len(prefix) :]: tensor for name, tensor in state.control.items() if name.startswith(prefix)}


def without_control(state: AdapterState, prefix: str) -> AdapterState:
    return AdapterState(
        dict(state.lora), dict(state.extra), dict(state.base), {n: t for n, t in state.control.items() if not n.startswith(prefix)}
    )


class ScaffoldClient(BaseClient):
    """Keeps c_i in the client store; corrects gradients by c - c_i; uploads y_i and dc_i."""

    def __init__(self, context, params):
        super().__init__(context, params)
        self._first_gradient: dict[str, Tensor] | None = None
        self._delta: dict[str, Tensor] | None = None

    def own_variate(self, reference: dict[str, Tensor]) -> dict[str, Tensor]:
        """c_i from the store (zeros for a client that never trained)."""
        stored = self.context.store.get(self.client_id) or {}
        return {key: stored[key] if key in stored else torch.zeros_like(t, dtype=torch.float32) for key, t in reference.items()}

    def hooks(self, round: int, start: AdapterState) -> TrainHooks:
        trainable = self.trainable(round)
        handles = variate_handles(self.workbench.active, trainable)
        server = control_of(start, CONTROL)
        own = self.own_variate(variate_tensors(start, trainable))
        corrections = {key: (server[key].float() if key in server else 0.0) - own[key] for key in handles}
        record_first = self.params.control_update == "option-i"
        self._first_gradient = None

        def after_backward() -> None:
            if record_first and self._first_gradient is None:
                self._first_gradient = {
                    key: p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                    for key, p in handles.items()
                }
            for key, param in handles.items():
                correction = corrections[key].to(param.dtype)
                if param.grad is None:
                    param.grad = correction.clone()
                else:
                    param.grad.add_(correction)

        return TrainHooks(after_backward=after_backward)

    def step_size_sum(self, round: int) -> float:
        """sum_t lr_t over the K local steps (K * lr for a constant schedule)."""
        plan = self.plan(round)
        return float(sum(plan.lr * lr_factor(step, plan) for step in range(plan.steps)))

    def next_variate(self, round: int, start: AdapterState, trained: AdapterState) -> dict[str, Tensor]:
        trainable = self.trainable(round)
        x = variate_tensors(start, trainable)
        y = variate_tensors(trained, trainable)
        if self.params.control_update == "option-i":
            if self._first_gradient is None:
                raise RuntimeError("option-i needs the first local gradient; was the client trained?")
            return self._first_gradient
        server = control_of(start, CONTROL)
        own = self.own_variate(x)
        steps = self.step_size_sum(round)
        return {key: own[key] - (server[key].float() if key in server else 0.0) + (x[key].float() - y[key].float()) / steps for key in x}

    def keep(self, round: int, start: AdapterState, trained: AdapterState) -> None:
        new = self.next_variate(round, start, trained)
        old = self.own_variate(new)
        self._delta = {key: new[key] - old[key] for key in new}
        self._first_gradient = None
        self.context.store.put(self.client_id, new)

    def upload(self, round: int, start: AdapterState, trained: AdapterState) -> AdapterState:
        delta, self._delta = self._delta, None
        if delta is None:
            raise RuntimeError("upload before keep")
        return with_control(trained, CONTROL_DELTA, delta)


class Scaffold(BaseServer):
    """SCAFFOLD on the adapter tensors (LoRA A, B and heads; never the scales). Mixed ranks are
    refused (variates need one shape per tensor). Not asynchronous: y_i - x and the |S|/N variate
    step assume every update started from the current x within one synchronous round."""

    spec = SPECS["scaffold"]
    client_class = ScaffoldClient

    def __init__(self, context, params):
        super().__init__(context, params)
        self.control: dict[str, Tensor] = {
            key: torch.zeros_like(t, dtype=torch.float32) for key, t in variate_tensors(self.global_state).items()
        }

    def configure(self, round: int, client_id: int) -> AdapterState:
        return with_control(self.global_state, CONTROL, self.control)

    def aggregate(self, round: int, updates: list[Update]) -> None:
        if not updates:
            return
        weights = example_weights(updates)
        states = [without_control(u.state, CONTROL_DELTA) for u in updates]
        averaged = average_states(states, weights, base=self.global_state)
        eta = float(self.params.server_lr)
        if eta != 1.0:
            old = self.global_state.to_tensors()
            new = averaged.to_tensors()
            for key in variate_tensors(averaged):
                new[key] = (old[key].float() + eta * (new[key].float() - old[key].float())).to(old[key].dtype)
            averaged = AdapterState.from_tensors(new)
        deltas = [control_of(u.state, CONTROL_DELTA) for u in updates]
        for update, delta in zip(updates, deltas):
            for key, c in self.control.items():
                if key not in delta or delta[key].shape != c.shape:
                    raise UpdateError(f"client {update.client_id} sent no valid control-variate change for '{key}'")
        total = self.context.num_clients
        # new tensors, not in-place: downloads already handed out keep the c they were given
        self.control = {key: c + sum(delta[key].float() for delta in deltas) / total for key, c in self.control.items()}
        self.global_state = averaged

    def state_dict(self) -> dict[str, Tensor]:
        tensors = super().state_dict()
        tensors.update({CONTROL + key: c for key, c in self.control.items()})
        return tensors

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        super().load_state_dict(tensors)
        self.control = {key: tensors[CONTROL + key].float().clone() for key in self.control}
