"""What protections read from and write into typed messages: the change of the model part.

A protection acts on ``AdapterState.model_tensors()`` (the LoRA factors present and the other
trainable tensors), never on control data. The change an update makes is upload − download on
those tensors; a protected result is the download plus a processed change, in the upload's form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from atoll.errors import UpdateError
from atoll.fl.state import AdapterState, LoRAFactors, Update
from atoll.privacy.vectors import Layout, flatten, unflatten

PROTECTED_MEAN = -3  # client id of the mean a protection hands to the algorithm's aggregation


def completed(download: AdapterState, initial: AdapterState) -> AdapterState:
    """``download`` with the model parts it leaves out taken from ``initial``: what a client
    starts from when its algorithm sends only part of the adapter (FLoRA's clients start each
    round from the fresh seeded adapter)."""
    lora = dict(download.lora)
    for name, factors in initial.lora.items():
        mine = lora.get(name)
        if mine is None:
            lora[name] = factors
        elif mine.A is None or mine.B is None:
            lora[name] = LoRAFactors(factors.A if mine.A is None else mine.A, factors.B if mine.B is None else mine.B, mine.scale)
    return AdapterState(lora, {**initial.extra, **download.extra}, dict(download.base), dict(download.control))


def start_of(context, client_id: int, download: AdapterState) -> AdapterState:
    """The model a client's change is measured from: its download, completed by the seeded initial
    adapter of its rank (``context`` is the server's or a client's run context)."""
    return completed(download, context.initial_state(context.client_ranks[client_id]))


def model_delta(upload: AdapterState, download: AdapterState, client_id: int) -> dict[str, Tensor]:
    """upload − download (float64) on every model tensor of the upload."""
    mine, reference = upload.model_tensors(), download.model_tensors()
    delta: dict[str, Tensor] = {}
    for key, tensor in mine.items():
        start = reference.get(key)
        if start is None:
            raise UpdateError(f"client {client_id} uploaded '{key}', which its download did not hold")
        if start.shape != tensor.shape:
            raise UpdateError(f"client {client_id} uploaded '{key}' of shape {tuple(tensor.shape)}, its download's is {tuple(start.shape)}")
        delta[key] = tensor.detach().to(torch.float64) - start.detach().to(torch.float64)
    return delta


def replace_model_tensors(state: AdapterState, tensors: dict[str, Tensor]) -> AdapterState:
    """A copy of ``state`` whose model tensors named in ``tensors`` are replaced (cast to their dtype)."""
    lora = {}
    for name, factors in state.lora.items():
        A = tensors.get(f"lora.{name}.A")
        B = tensors.get(f"lora.{name}.B")
        lora[name] = LoRAFactors(
            factors.A if A is None or factors.A is None else A.to(factors.A.dtype),
            factors.B if B is None or factors.B is None else B.to(factors.B.dtype),
            factors.scale,
        )
    extra = {key: tensors[f"extra.{key}"].to(t.dtype) if f"extra.{key}" in tensors else t for key, t in state.extra.items()}
    return AdapterState(lora, extra, dict(state.base), dict(state.control))


def applied(template: AdapterState, download: AdapterState, delta: dict[str, Tensor]) -> AdapterState:
    """``template`` (an upload's form) holding download + delta on the keys of ``delta``."""
    start = download.model_tensors()
    return replace_model_tensors(template, {key: start[key].to(torch.float64) + value for key, value in delta.items()})


def flat_delta(upload: AdapterState, download: AdapterState, client_id: int) -> tuple[Tensor, Layout]:
    """The change of an update as one float64 vector, with the layout to turn it back."""
    return flatten(model_delta(upload, download, client_id))


def unflat(vector: Tensor, layout: Layout) -> dict[str, Tensor]:
    return {key: value.to(torch.float64) for key, value in unflatten(vector.to(torch.float64), layout).items()}


def refuse_control(updates: list[Update], what: str) -> None:
    """A protected mean cannot carry an algorithm's control data."""
    for update in updates:
        if update.state.control:
            raise UpdateError(f"client {update.client_id} sent control data, which {what} cannot combine", "use an algorithm without it")
