"""A party's share of the model: the architecture with every module the party does not hold
removed, and per slice a choice of LoRA, full fine-tuning, or frozen.

Module paths stay those of the unsplit model, so a party's adapter, written with PEFT's
``save_pretrained``, loads onto the full base model with ``PeftModel.from_pretrained`` (its
``layers_to_transform`` names the party's blocks), and the union of the parties' tensors is
exactly the unsplit model (a test checks nothing is missing or held twice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from atoll.errors import ConfigError
from atoll.seeding import torch_generator
from atoll.split.families import Family, HeadKind, family_of
from atoll.split.partition import Role, SliceSpec

PEFT_PREFIX = "base_model.model."
Tuning = Literal["lora", "full", "frozen"]


@dataclass(frozen=True)
class LoRASettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | Literal["auto"] = "auto"
    rslora: bool = False


@dataclass(frozen=True)
class SliceTuning:
    """How one slice is trained: LoRA adapters, full fine-tuning, or not at all; plus modules
    trained in full next to LoRA (PEFT ``modules_to_save``, e.g. ``lm_head`` of a random-init LM)."""

    mode: Tuning = "lora"
    trainable_modules: tuple[str, ...] = field(default_factory=tuple)


class Absent(nn.Module):
    """Stands where a module of the other party was: holds nothing, refuses to run."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"this party does not hold {self.what}")


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def init_lora(model: nn.Module, seed: int) -> None:
    """Re-initialise every LoRA A (Kaiming-uniform, as PEFT does) from a stream keyed by the module
    path, and B to zero: the same initial adapter whatever the cut or the process."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer):
                name = path[len(PEFT_PREFIX) :] if path.startswith(PEFT_PREFIX) else path
                for adapter in module.lora_A:
                    nn.init.kaiming_uniform_(module.lora_A[adapter].weight, a=math.sqrt(5), generator=torch_generator(seed, "lora-A", name))
                    nn.init.zeros_(module.lora_B[adapter].weight)


class PartyModel:
    """The slices one party holds, carved out of a full task model (which it takes over)."""

    def __init__(
        self,
        model: nn.Module,
        head: HeadKind,
        slices: list[SliceSpec],
        tuning: dict[str, SliceTuning],
        lora: LoRASettings,
        seed: int,
    ):
        from atoll.models.registry import target_modules

        for param in model.parameters():
            param.requires_grad_(False)
        self.family: Family = family_of(model, head)
        self.slices: dict[Role, SliceSpec] = {s.role: s for s in slices}
        self.tuning = {role: tuning.get(role, SliceTuning()) for role in self.slices}
        self.model = model
        self._owned = self._owned_paths()
        self._carve()
        self.configs = {role: self.family.slice_config(list(spec.blocks)) for role, spec in self.slices.items()}
        for spec in self.slices.values():
            self.family.renumber(list(spec.blocks))
        lora_blocks = sorted(i for role, spec in self.slices.items() if self.tuning[role].mode == "lora" for i in spec.blocks)
        saved = self._modules_to_save()
        self.peft = None
        lora_roles = [role for role in self.slices if self.tuning[role].mode == "lora"]
        for role in lora_roles:
            if not self.slices[role].blocks:
                raise ConfigError(
                    f"the {role} slice has no blocks to put LoRA adapters on",
                    f"set split.slices.{role}.tuning to full or frozen, or give the slice blocks",
                )
        if lora_roles:
            from peft import LoraConfig, get_peft_model

            requested = "auto" if lora.target_modules == "auto" else list(lora.target_modules)
            targets = target_modules(model, requested)
            config = LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=targets,
                use_rslora=lora.rslora,
                layers_to_transform=lora_blocks,
                layers_pattern=self.family.blocks_path().rsplit(".", 1)[-1],
                modules_to_save=saved or None,
            )
            self.peft = get_peft_model(model, config)
            init_lora(self.peft, seed)
        self._set_trainable()

    # -- carving ----------------------------------------------------------------------------------
    def _owned_paths(self) -> dict[Role, list[str]]:
        blocks_path = self.family.blocks_path()
        owned: dict[Role, list[str]] = {}
        for role, spec in self.slices.items():
            paths = [f"{blocks_path}.{i}" for i in spec.blocks]
            if spec.has_input:
                paths += self.family.input_paths()
            if spec.has_output:
                paths += self.family.output_paths()
            owned[role] = paths
        return owned

    def _carve(self) -> None:
        owned = {p for paths in self._owned.values() for p in paths}
        blocks = self.family.blocks()
        for index in range(len(blocks)):
            if f"{self.family.blocks_path()}.{index}" not in owned:
                blocks[index] = Absent(f"block {index}")
        for path in self.family.input_paths() + self.family.output_paths():
            if path not in owned and not isinstance(self.model.get_submodule(path), Absent):
                _replace(self.model, path, Absent(path))
        stray = [n for n, _ in self.model.named_parameters() if self.role_of(n) is None]
        if stray:
            raise RuntimeError(f"parameter '{stray[0]}' belongs to no slice: the {self.family.name} layout is incomplete")

    def role_of(self, name: str) -> Role | None:
        """The slice a parameter (named as in the unsplit model, PEFT wrappers allowed) belongs to."""
        for role, paths in self._owned.items():
            for path in paths:
                if name == path or name.startswith(path + "."):
                    return role
        return None

    def _modules_to_save(self) -> list[str]:
        saved: list[str] = []
        for role, spec in self.slices.items():
            tuning = self.tuning[role]
            if tuning.mode != "lora":
                if tuning.trainable_modules:
                    raise ConfigError(
                        f"split.slices.{role}.trainable_modules applies to LoRA slices only",
                        "a full slice trains all its modules; remove the key",
                    )
                continue
            names = list(tuning.trainable_modules)
            if spec.has_output:
                names += [n for n in self.family.task_head_names() if n not in names]
            leaf_owners = {}
            for path, _ in self.model.named_modules():
                if path and self.role_of(path) == role:
                    leaf_owners.setdefault(path.rsplit(".", 1)[-1], path)
            for name in tuning.trainable_modules:
                if name not in leaf_owners:
                    raise ConfigError(
                        f"split.slices.{role}.trainable_modules names '{name}', which the {role} slice does not hold",
                        f"choose from: {', '.join(sorted(leaf_owners)[:30])}",
                    )
            saved += names
        return saved

    def _set_trainable(self) -> None:
        self.trainable: dict[Role, list[nn.Parameter]] = {role: [] for role in self.slices}
        for name, param in self.model.named_parameters():
            role = self.role_of(name)
            mode = self.tuning[role].mode if role else "frozen"
            if mode == "full":
                train = True
            elif mode == "lora":
                train = ".lora_" in name or ".modules_to_save." in name
            else:
                train = False
            param.requires_grad_(train)
            if train:
                self.trainable[role].append(param)

    # -- running ----------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter of this party, slice by slice."""
        return [p for role in self.slices for p in self.trainable[role]]

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Token ids -> word embeddings (the lookup table only; head slice)."""
        return self.family.word_embeddings()(input_ids)

    def run(self, role: Role, inputs: Tensor, mask: Tensor, token_type_ids: Tensor | None = None, cache=None) -> Tensor:
        """Run one slice: word embeddings (head) or hidden states in; hidden states or task outputs out."""
        spec = self.slices[role]
        hidden = inputs
        if spec.has_input:
            hidden = self.family.embed(hidden, mask, token_type_ids)
        if spec.blocks:
            hidden = self.family.run_blocks(list(spec.blocks), self.configs[role], hidden, mask, cache)
        if spec.has_output:
            hidden = self.family.finish(hidden, mask)
        return hidden

    def new_cache(self, role: Role):
        """An empty KV cache for one slice's blocks (None for encoders)."""
        return self.family.new_cache(self.configs[role])

    # -- output -----------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.model.parameters())
        trained = sum(p.numel() for p in self.parameters())
        return {"parameters": total, "trainable_parameters": trained}

    def save(self, directory: Path) -> list[str]:
        """Write this party's trained tensors: LoRA slices as a PEFT adapter in ``adapter/``, fully
        fine-tuned slices as ``full_weights.safetensors`` (names of the unsplit model)."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        written = []
        if self.peft is not None:
            self.peft.save_pretrained(str(directory / "adapter"))
            written.append("adapter")
        full = {
            name: param.detach().clone().contiguous()
            for name, param in self.model.named_parameters()
            if (role := self.role_of(name)) is not None and self.tuning[role].mode == "full"
        }
        if full:
            save_file(full, str(directory / "full_weights.safetensors"))
            written.append("full_weights.safetensors")
        return written
