"""Capture what a linear (LoRA) module receives as input, for any model: a forward pre-hook."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


@contextmanager
def capture_inputs(model: nn.Module, module_names: list[str]) -> Iterator[dict[str, Tensor]]:
    """While active, ``captured[name]`` holds the last input (batch x length x features) of each module."""
    modules = dict(model.named_modules())
    missing = [name for name in module_names if name not in modules]
    if missing:
        raise KeyError(f"model has no module {missing[0]}")
    captured: dict[str, Tensor] = {}
    handles = []
    for name in module_names:

        def hook(_module, args, name=name):
            captured[name] = args[0].detach()

        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def last_position_inputs(model: nn.Module, module_name: str, sequences: list[list[int]], batch_size: int = 256) -> Tensor:
    """Input of ``module_name`` at the last position of each (equal-length) token sequence."""
    rows = []
    with capture_inputs(model, [module_name]) as captured:
        for start in range(0, len(sequences), batch_size):
            ids = torch.tensor(sequences[start : start + batch_size], dtype=torch.long)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            rows.append(captured[module_name][:, -1].to(torch.float64))
    return torch.cat(rows)
