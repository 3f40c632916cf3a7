"""The on-device model: next-token log-probabilities of the tuned edge (with its LoRA adapter and
any dense base delta) and, for proxy-tuning, of the same model with both disabled (the pristine
pretrained model), each with its own KV cache.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from atoll.hybrid.loading import base_delta_of


@dataclass
class EdgeStep:
    """Log-probabilities over the edge vocabulary for the next position."""

    tuned: torch.Tensor
    base: torch.Tensor | None


class EdgeModel:
    """Incremental decoding of one sequence at a time (``start`` a prompt, then ``advance`` by
    one token); not thread-safe, one sequence per instance at a time."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.has_adapter = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        self.base_delta = base_delta_of(model) if self.has_adapter else None
        config = getattr(model, "config", None)
        self.max_positions = int(getattr(config, "max_position_embeddings", 1024) or 1024)
        self._ids: list[int] = []
        self._with_base = False
        self._past: dict[str, object] = {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    @torch.no_grad()
    def start(self, prompt_ids: list[int], with_base: bool = False) -> EdgeStep:
        if not prompt_ids:
            bos = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
            prompt_ids = [bos]
        self._ids = list(prompt_ids)[-(self.max_positions - 1) :]
        self._with_base = with_base
        self._past = {}
        return self._forward(self._ids)

    @torch.no_grad()
    def advance(self, token_id: int) -> EdgeStep:
        self._ids.append(token_id)
        if len(self._ids) >= self.max_positions:  # past the context: recompute over the newest window
            self._ids = self._ids[-(self.max_positions // 2) :]
            self._past = {}
            return self._forward(self._ids)
        return self._forward([token_id])

    def _forward(self, new_ids: list[int]) -> EdgeStep:
        inputs = torch.tensor([new_ids])
        tuned = self._run("tuned", inputs)
        base = None
        if self._with_base:
            if self.has_adapter:
                with self.model.disable_adapter(), self.base_delta.disabled() if self.base_delta else nullcontext():
                    base = self._run("base", inputs)
            else:
                base = tuned
        return EdgeStep(tuned, base)

    def _run(self, which: str, inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=inputs, past_key_values=self._past.get(which), use_cache=True)
        self._past[which] = out.past_key_values
        return torch.log_softmax(out.logits[0, -1].float(), dim=-1)
