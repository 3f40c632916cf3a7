"""Architecture families: where a model keeps its embeddings, blocks and task head, and how to run
a range of its blocks on their own, with a KV cache of their own.

A split party holds a few of a model's blocks; it must run them without the others. Each family
below reproduces the forward pass of its Hugging Face model class piece by piece (embedding,
blocks, final norm and task head), so that running the pieces one after another gives the same
numbers as the unsplit model (tests/split/test_partition.py checks it for every family).

Supported: decoder-only Llama-style models (llama, qwen2, mistral), GPT-2, and BERT-style
encoders (bert, which includes the packaged MiniLM, roberta, xlm-roberta).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from atoll.errors import ModelError

HeadKind = Literal["classification", "question-answering", "causal-lm"]
# the task head of decoder models (encoders name theirs in EncoderFamily)
_HEAD_MODULE = {"causal-lm": "lm_head", "classification": "score", "question-answering": "qa_outputs"}


def positions_from_mask(mask: Tensor) -> Tensor:
    """Position ids from a 2-D attention mask, as Hugging Face's generation does: 0 at the first
    real token, padding at 1. With right padding this equals ``arange`` on the real tokens."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the rightmost real token of each row (the position a causal classifier pools)."""
    steps = torch.arange(mask.shape[-1], device=mask.device)
    return (steps * (mask != 0)).argmax(-1)


class Family:
    """The layout of one architecture family and how to run its pieces."""

    name = ""
    model_types: tuple[str, ...] = ()
    causal = True

    def __init__(self, model: nn.Module, head: HeadKind):
        self.model = model
        self.head = head
        self.prefix = model.base_model_prefix
        self.base = getattr(model, self.prefix)

    # -- layout -----------------------------------------------------------------------------------
    def blocks_path(self) -> str:
        raise NotImplementedError

    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path())

    def num_blocks(self) -> int:
        return len(self.blocks())

    def input_paths(self) -> list[str]:
        """Modules the head slice owns besides its blocks (embeddings)."""
        raise NotImplementedError

    def output_paths(self) -> list[str]:
        """Modules the last slice owns besides its blocks (final norm, pooler, task head)."""
        raise NotImplementedError

    def task_head_names(self) -> list[str]:
        """Leaf names of a freshly initialised task head, trained in full next to LoRA (PEFT
        modules_to_save); a causal LM's pretrained ``lm_head`` is not among them."""
        raise NotImplementedError

    def word_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def slice_config(self, indices: list[int]):
        """A copy of the model config describing only ``indices`` (for a cache of those blocks)."""
        config = copy.deepcopy(self.model.config)
        config.num_hidden_layers = len(indices)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            config.layer_types = [layer_types[i] for i in indices]
        return config

    def renumber(self, indices: list[int]) -> None:
        """Give the blocks ``indices`` local cache slots 0..k-1 (each slice has its own cache)."""
        for local, index in enumerate(indices):
            attention = self._attention(self.blocks()[index])
            if attention is not None:
                attention.layer_idx = local

    def _attention(self, block: nn.Module) -> nn.Module | None:
        return None

    # -- running ----------------------------------------------------------------------------------
    def embed(self, word_embeddings: Tensor, mask: Tensor, token_type_ids: Tensor | None) -> Tensor:
        """Word embeddings (the output of the lookup table) -> the first block's input."""
        raise NotImplementedError

    def new_cache(self, config):
        from transformers import DynamicCache

        return DynamicCache(config=config)

    def run_blocks(self, indices: list[int], config, hidden: Tensor, mask: Tensor, cache=None) -> Tensor:
        """Blocks ``indices`` on ``hidden`` [B, q, d]; ``mask`` covers the cached and new positions."""
        raise NotImplementedError

    def finish(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """Final norm and task head: class logits [B, C], span logits [B, L, 2] or token logits [B, L, V]."""
        raise NotImplementedError


class DecoderFamily(Family):
    """Llama-style decoders (Llama, Qwen2, Mistral): RMSNorm blocks with rotary positions."""

    name = "decoder"
    model_types = ("llama", "qwen2", "mistral")

    def blocks_path(self) -> str:
        return f"{self.prefix}.layers"

    def input_paths(self) -> list[str]:
        return [f"{self.prefix}.embed_tokens"]

    def output_paths(self) -> list[str]:
        return [f"{self.prefix}.norm", _HEAD_MODULE[self.head]]

    def task_head_names(self) -> list[str]:
        return [] if self.head == "causal-lm" else [_HEAD_MODULE[self.head]]

    def _attention(self, block: nn.Module) -> nn.Module | None:
        return block.self_attn

    def embed(self, word_embeddings: Tensor, mask: Tensor, token_type_ids: Tensor | None) -> Tensor:
        return word_embeddings

    def run_blocks(self, indices: list[int], config, hidden: Tensor, mask: Tensor, cache=None) -> Tensor:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        positions = positions_from_mask(mask)[:, -hidden.shape[1] :]
        arguments = dict(config=config, inputs_embeds=hidden, attention_mask=mask, past_key_values=cache, position_ids=positions)
        masks = {"full_attention": create_causal_mask(**arguments)}
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * len(indices)
        if "sliding_attention" in layer_types:
            masks["sliding_attention"] = create_sliding_window_causal_mask(**arguments)
        rotary = self.base.rotary_emb(hidden, positions)
        blocks = self.blocks()
        for local, index in enumerate(indices):
            hidden = blocks[index](
                hidden,
                attention_mask=masks[layer_types[local]],
                position_embeddings=rotary,
                position_ids=positions,
                past_key_values=cache,
                use_cache=cache is not None,
            )
        return hidden

    def finish(self, hidden: Tensor, mask: Tensor) -> Tensor:
        hidden = self.base.norm(hidden)
        if self.head == "causal-lm":
            return self.model.lm_head(hidden)
        if self.head == "question-answering":
            return self.model.qa_outputs(hidden)
        logits = self.model.score(hidden)
        return logits[torch.arange(hidden.shape[0]), last_token_index(mask[:, -hidden.shape[1] :])]


class GPT2Family(Family):
    """GPT-2: learned absolute positions, LayerNorm blocks, tied LM head (untied at a cut: each
    party holds its own copy)."""

    name = "gpt2"
    model_types = ("gpt2",)

    def blocks_path(self) -> str:
        return f"{self.prefix}.h"

    def input_paths(self) -> list[str]:
        return [f"{self.prefix}.wte", f"{self.prefix}.wpe"]

    def output_paths(self) -> list[str]:
        return [f"{self.prefix}.ln_f", _HEAD_MODULE[self.head]]

    def task_head_names(self) -> list[str]:
        return [] if self.head == "causal-lm" else [_HEAD_MODULE[self.head]]

    def slice_config(self, indices: list[int]):
        config = super().slice_config(indices)
        config.n_layer = len(indices)
        return config

    def _attention(self, block: nn.Module) -> nn.Module | None:
        return block.attn

    def embed(self, word_embeddings: Tensor, mask: Tensor, token_type_ids: Tensor | None) -> Tensor:
        positions = positions_from_mask(mask)[:, -word_embeddings.shape[1] :]
        return self.base.drop(word_embeddings + self.base.wpe(positions))

    def run_blocks(self, indices: list[int], config, hidden: Tensor, mask: Tensor, cache=None) -> Tensor:
        from transformers.masking_utils import create_causal_mask

        positions = positions_from_mask(mask)[:, -hidden.shape[1] :]
        causal = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=mask, past_key_values=cache, position_ids=positions)
        blocks = self.blocks()
        for index in indices:
            hidden = blocks[index](hidden, cache, causal, use_cache=cache is not None, position_ids=positions)
        return hidden

    def finish(self, hidden: Tensor, mask: Tensor) -> Tensor:
        hidden = self.base.ln_f(hidden)
        if self.head == "causal-lm":
            return self.model.lm_head(hidden)
        if self.head == "question-answering":
            return self.model.qa_outputs(hidden)
        logits = self.model.score(hidden)
        return logits[torch.arange(hidden.shape[0]), last_token_index(mask[:, -hidden.shape[1] :])]


class EncoderFamily(Family):
    """BERT-style encoders (BERT and MiniLM, RoBERTa, XLM-R): absolute positions, bidirectional
    attention, no cache; classification pools the first token."""

    name = "encoder"
    model_types = ("bert", "roberta", "xlm-roberta")
    causal = False

    def blocks_path(self) -> str:
        return f"{self.prefix}.encoder.layer"

    def input_paths(self) -> list[str]:
        return [f"{self.prefix}.embeddings"]

    def output_paths(self) -> list[str]:
        paths = [f"{self.prefix}.pooler"] if getattr(self.base, "pooler", None) is not None else []
        if self.head == "classification" and hasattr(self.model, "dropout"):
            paths.append("dropout")
        return paths + self.task_head_names()

    def task_head_names(self) -> list[str]:
        return ["qa_outputs"] if self.head == "question-answering" else ["classifier"]

    def embed(self, word_embeddings: Tensor, mask: Tensor, token_type_ids: Tensor | None) -> Tensor:
        # positions: BERT counts from 0, RoBERTa from padding_idx + 1; both the same as from input
        # ids on real (right-padded) tokens
        return self.base.embeddings(inputs_embeds=word_embeddings, token_type_ids=token_type_ids)

    def new_cache(self, config):
        return None

    def run_blocks(self, indices: list[int], config, hidden: Tensor, mask: Tensor, cache=None) -> Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        if cache is not None:
            raise ModelError("encoders have no KV cache and cannot generate", "use a causal LM for generation")
        extended = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)
        blocks = self.blocks()
        for index in indices:
            hidden = blocks[index](hidden, extended)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return hidden

    def finish(self, hidden: Tensor, mask: Tensor) -> Tensor:
        if self.head == "question-answering":
            return self.model.qa_outputs(hidden)
        if self.model.config.model_type == "bert":
            pooled = self.base.pooler(hidden)
            return self.model.classifier(self.model.dropout(pooled))
        return self.model.classifier(hidden)


FAMILIES: tuple[type[Family], ...] = (DecoderFamily, GPT2Family, EncoderFamily)


def family_of(model: nn.Module, head: HeadKind) -> Family:
    """The family object for a loaded Hugging Face task model; other architectures are refused."""
    model_type = getattr(model.config, "model_type", "")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family(model, head)
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ModelError(f"split learning does not know how to cut a '{model_type}' model", f"use one of: {supported}")
