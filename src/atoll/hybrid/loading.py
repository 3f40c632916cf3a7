"""Load a pretrained causal LM and its tokenizer by registry name or local directory, plus an
optional PEFT adapter. Random-init built-ins are refused: their tokenizer is trained on a task's
text at run time, so there is no fixed model to serve or fuse.
"""

from __future__ import annotations

from pathlib import Path

import torch

from atoll.errors import ModelError


def load_causal_lm(name: str, dtype: str = "float32", adapter: str | None = None, seed: int = 0):
    """(model in eval mode, tokenizer) for ``name``; with ``adapter``, a PeftModel around it."""
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


def attach_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """Wrap ``model`` with the PEFT adapter in directory ``adapter``."""
    from peft import PeftModel

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"'{adapter}' is not a PEFT adapter directory (no adapter_config.json)", "point edge.adapter at one")
    if (path / "base_delta.safetensors").is_file():
        raise ModelError(
            f"adapter '{adapter}' comes with base_delta.safetensors (an algorithm that merges into the base)",
            "hybrid inference loads plain LoRA adapters; export a personal adapter or use an algorithm without a base delta",
        )
    try:
        return PeftModel.from_pretrained(model, str(path))
    except Exception as exc:
        raise ModelError(
            f"cannot load adapter '{adapter}' on this model ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
            "the adapter must have been trained on the same base model",
        ) from None
