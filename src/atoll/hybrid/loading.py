"""Load a pretrained causal LM and its tokenizer by registry name or local directory, plus an
optional PEFT adapter and the dense base delta some algorithms write beside it
(``base_delta.safetensors``: FlexLoRA's remainder, FLoRA's and FedEx-LoRA's merged updates).
Random-init built-ins are refused: their tokenizer is trained on a task's text at run time, so
there is no fixed model to serve or fuse.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from atoll.errors import ConfigError, ModelError

BASE_DELTA_FILE = "base_delta.safetensors"


def load_causal_lm(name: str, dtype: str = "float32", adapter: str | None = None, seed: int = 0):
    """(model in eval mode, tokenizer) for ``name``; with ``adapter``, a PeftModel around it (and
    its base delta added, see :class:`BaseDelta`: reach it as ``base_delta_of(model)``)."""
    from atoll.data.tasks import default_cache_dir
    from atoll.models.registry import BUILTIN_MODELS, load_base_model, load_tokenizer

    builtin = BUILTIN_MODELS.get(name)
    if builtin is not None and not builtin.pretrained:
        raise ModelError(
            f"'{name}' is a random-init built-in with no fixed tokenizer",
            "hybrid inference needs a pretrained causal LM: a local Hugging Face directory or a shipped pretrained model",
        )
    if builtin is not None and builtin.family != "causal":
        raise ModelError(f"'{name}' is an encoder and cannot generate text", "use a causal LM")

    def no_corpus() -> list[str]:
        raise ModelError(f"model '{name}' has no tokenizer of its own", "use a pretrained model directory")

    tokenizer = load_tokenizer(name, no_corpus, default_cache_dir())
    model = load_base_model(name, generative=True, num_labels=0, tokenizer=tokenizer, dtype=dtype, seed=seed)
    if adapter is not None:
        model = attach_adapter(model, adapter)
    model.eval()
    return model, tokenizer


class BaseDelta:
    """A dense update ΔW per linear module, added to the module's output as x ΔWᵀ by a forward hook:
    the model computes (W0 + ΔW) x without its weights being changed, so the delta can be switched
    off (``disabled()``) together with the LoRA adapter, and proxy-tuning's untuned edge is the
    pristine base. The hooks sit on the base model's modules, which PEFT wraps without replacing."""

    def __init__(self, model: torch.nn.Module, deltas: dict[str, torch.Tensor], source: str):
        self.enabled = True
        self.modules = sorted(deltas)
        self._handles = []
        for name in self.modules:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ModelError(
                    f"{source} names module '{name}', which this model does not have",
                    "the adapter must have been trained on the same base model",
                ) from None
            weight = getattr(module, "weight", None)
            if not isinstance(module, torch.nn.Linear) or weight is None or tuple(weight.shape) != tuple(deltas[name].shape):
                shape = tuple(weight.shape) if weight is not None else None
                raise ModelError(
                    f"{source}: delta of '{name}' has shape {tuple(deltas[name].shape)}, the module's weight {shape}",
                    "the adapter must have been trained on the same base model",
                )
            self._handles.append(module.register_forward_hook(self._hook(deltas[name].to(weight.dtype))))

    def _hook(self, delta: torch.Tensor):
        def add(module, inputs, output):
            return output + F.linear(inputs[0], delta) if self.enabled else output

        return add

    @contextmanager
    def disabled(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def base_delta_of(model: torch.nn.Module) -> BaseDelta | None:
    """The :class:`BaseDelta` ``attach_adapter`` put on ``model``, if its adapter had one."""
    return getattr(model, "_atoll_base_delta", None)


def attach_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """Wrap ``model`` with the PEFT adapter in directory ``adapter``; a ``base_delta.safetensors``
    beside it is added through :class:`BaseDelta` first."""
    from peft import PeftModel
    from safetensors.torch import load_file

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"'{adapter}' is not a PEFT adapter directory (no adapter_config.json)", "point edge.adapter at one")
    delta = None
    if (path / BASE_DELTA_FILE).is_file():
        delta = BaseDelta(model, load_file(str(path / BASE_DELTA_FILE)), f"{path / BASE_DELTA_FILE}")
    try:
        wrapped = PeftModel.from_pretrained(model, str(path))
    except Exception as exc:
        if delta is not None:
            delta.remove()
        raise ModelError(
            f"cannot load adapter '{adapter}' on this model ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
            "the adapter must have been trained on the same base model",
        ) from None
    wrapped._atoll_base_delta = delta
    return wrapped


def run_config(run_dir: str):
    """The config a federated run directory was made with (its config.yaml)."""
    from atoll.config import load_config

    root = Path(run_dir).expanduser()
    if not (root / "config.yaml").is_file():
        raise ConfigError(f"edge.run '{run_dir}' is not an atoll run directory (no config.yaml)", "point it at a finished `atoll run`")
    return load_config(root / "config.yaml")


def edge_source(edge) -> tuple[str, str | None]:
    """(edge model, adapter directory or None) of an ``edge:`` config section: with ``edge.run``,
    the run's model and ``edge.client``'s adapter from it (an explicit, different edge.model is an error)."""
    if edge.run is None:
        return edge.model, edge.adapter
    config = run_config(edge.run)
    if config.federation.clients <= edge.client:
        raise ConfigError(f"edge.client {edge.client} is not a client of run '{edge.run}' ({config.federation.clients} clients)")
    if "model" in edge.model_fields_set and edge.model != config.model.name:
        raise ConfigError(
            f"edge.model '{edge.model}' differs from the model of run '{edge.run}' ('{config.model.name}')", "drop edge.model"
        )
    return config.model.name, str(run_adapter(edge.run, edge.client))


def run_adapter(run_dir: str, client: int) -> Path:
    """The adapter client ``client`` of federated run ``run_dir`` uses: its exported personal adapter
    (``personal/client_K``: for clustered-lora its cluster's adapter at its rank), else the run's
    global adapter (``adapter/``, with its base delta if any)."""
    root = Path(run_dir).expanduser()
    personal = root / "personal" / f"client_{client}"
    if personal.is_dir():
        return personal
    if (root / "personal").is_dir():
        raise ConfigError(f"run '{run_dir}' exported no personal adapter for client {client}", "choose one of its clients")
    if (root / "adapter" / "adapter_config.json").is_file():
        return root / "adapter"
    raise ConfigError(
        f"run '{run_dir}' has neither personal/client_{client} nor a global adapter/",
        "run it to the end, with run.export_personal: true for a personalized algorithm",
    )
