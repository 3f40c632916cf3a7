"""THE one place that knows PEFT's names: LoRA layers, ``lora_A/lora_B``, ``modules_to_save``.

:class:`LiveAdapter` holds direct handles to one PEFT adapter's tensors inside the live model, so
reading or writing an :class:`~atoll.fl.state.AdapterState` is a handful of tensor copies
(milliseconds), never a state-dict walk. :class:`BaseWeights` applies dense merged deltas
(FLoRA, FedEx-LoRA) on top of the pristine base weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from atoll.errors import UpdateError
from atoll.fl.state import AdapterState, LoRAFactors

PEFT_PREFIX = "base_model.model."


def module_name(peft_path: str) -> str:
    """'base_model.model.bert.encoder...query' -> 'bert.encoder...query'."""
    return peft_path[len(PEFT_PREFIX) :] if peft_path.startswith(PEFT_PREFIX) else peft_path


def adapter_name(rank: int, default_rank: int) -> str:
    return "default" if rank == default_rank else f"rank{rank}"


def is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def is_saved_module(module: nn.Module) -> bool:
    from peft.utils import ModulesToSaveWrapper

    return isinstance(module, ModulesToSaveWrapper)


class LiveAdapter:
    """Handles to the tensors of one named PEFT adapter inside a live ``PeftModel``."""

    def __init__(self, peft_model: nn.Module, name: str):
        self.name = name
        self.lora: dict[str, tuple[nn.Parameter, nn.Parameter, float]] = {}
        self.extra: dict[str, nn.Parameter] = {}
        for path, module in peft_model.named_modules():
            if is_lora_layer(module) and name in module.lora_A:
                self.lora[module_name(path)] = (
                    module.lora_A[name].weight,
                    module.lora_B[name].weight,
                    float(module.scaling[name]),
                )
            elif is_saved_module(module) and name in module.modules_to_save:
                for param_name, param in module.modules_to_save[name].named_parameters():
                    self.extra[f"{module_name(path)}.{param_name}"] = param
        if not self.lora:
            raise ValueError(f"adapter '{name}' has no LoRA layers")

    @property
    def rank(self) -> int:
        return int(next(iter(self.lora.values()))[0].shape[0])

    def read(self) -> AdapterState:
        """A detached copy of the adapter (safe to keep after the model trains on)."""
        with torch.no_grad():
            lora = {n: LoRAFactors(a.detach().clone(), b.detach().clone(), s) for n, (a, b, s) in self.lora.items()}
            extra = {n: p.detach().clone() for n, p in self.extra.items()}
        return AdapterState(lora, extra)

    def write(self, state: AdapterState, strict: bool = True) -> None:
        """Copy ``state`` into the live tensors; unknown names or wrong shapes are refused (a
        malformed or hostile update). ``strict`` also requires every live tensor to be covered, so
        nothing of the previous client can survive into the next one."""
        if strict:
            missing = [n for n in self.lora if n not in state.lora] + [n for n in self.extra if n not in state.extra]
            if missing:
                raise UpdateError(f"adapter state lacks {len(missing)} live tensors, e.g. '{missing[0]}'")
        with torch.no_grad():
            for name, factors in state.lora.items():
                handles = self.lora.get(name)
                if handles is None:
                    raise UpdateError(f"adapter state names unknown module '{name}'")
                a, b, scale = handles
                if not factors.complete:
                    raise UpdateError(
                        f"module '{name}' lacks its {'A' if factors.A is None else 'B'} factor; a partial message cannot be loaded"
                    )
                if factors.A.shape != a.shape or factors.B.shape != b.shape:
                    raise UpdateError(
                        f"module '{name}' has A{tuple(factors.A.shape)} B{tuple(factors.B.shape)}, "
                        f"the live adapter expects A{tuple(a.shape)} B{tuple(b.shape)}"
                    )
                if abs(factors.scale - scale) > 1e-6 * max(1.0, abs(scale)):
                    raise UpdateError(f"module '{name}' has scale {factors.scale}, the live adapter uses {scale}")
                a.copy_(factors.A)
                b.copy_(factors.B)
            for name, tensor in state.extra.items():
                param = self.extra.get(name)
                if param is None:
                    continue  # algorithm-private extras (control variates, routers) are not model tensors
                if tensor.shape != param.shape:
                    raise UpdateError(f"'{name}' has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                param.copy_(tensor)

    def parameters(self, lora_A: bool = True, lora_B: bool = True, extra: bool = True) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for a, b, _ in self.lora.values():
            if lora_A:
                params.append(a)
            if lora_B:
                params.append(b)
        if extra:
            params.extend(self.extra.values())
        return params

    def all_parameters(self) -> list[nn.Parameter]:
        return self.parameters(True, True, True)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.all_parameters())


class BaseWeights:
    """Sets W = W0 + delta on base layers of LoRA modules; keeps W0 of touched layers only."""

    def __init__(self, peft_model: nn.Module):
        self._layers: dict[str, nn.Linear] = {}
        for path, module in peft_model.named_modules():
            if is_lora_layer(module):
                self._layers[module_name(path)] = module.get_base_layer()
        self._pristine: dict[str, Tensor] = {}

    def apply(self, deltas: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name in list(self._pristine):
                if name not in deltas:
                    self._layers[name].weight.copy_(self._pristine.pop(name))
            for name, delta in deltas.items():
                layer = self._layers.get(name)
                if layer is None:
                    raise UpdateError(f"base delta names unknown module '{name}'")
                if delta.shape != layer.weight.shape:
                    raise UpdateError(f"base delta of '{name}' has shape {tuple(delta.shape)}, expected {tuple(layer.weight.shape)}")
                if name not in self._pristine:
                    self._pristine[name] = layer.weight.detach().clone()
                layer.weight.copy_(self._pristine[name] + delta.to(layer.weight.dtype))

    def shape(self, name: str) -> tuple[int, int]:
        return tuple(self._layers[name].weight.shape)  # type: ignore[return-value]

    def pristine(self, name: str) -> Tensor:
        """A copy of the frozen base weight W0 of module ``name`` as loaded, whatever delta is
        applied now (ILoRA's QR initialisation factorises it)."""
        if name not in self._layers:
            raise UpdateError(f"unknown LoRA module '{name}'")
        with torch.no_grad():
            return self._pristine.get(name, self._layers[name].weight).detach().clone()
