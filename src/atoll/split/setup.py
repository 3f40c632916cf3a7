"""Everything a split run needs that can fail on user input, done before any run directory exists:
data, task, tokenizer, test set, the data parties' shares, the model and the cut."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from atoll.data.partition import partition
from atoll.data.sources import RawData, load_source
from atoll.data.tasks import Tokenized, default_cache_dir, resolve_task, tokenize
from atoll.errors import ConfigError, DataError
from atoll.models.registry import check_model_for_task, check_model_name, load_tokenizer
from atoll.seeding import numpy_rng
from atoll.split.config import SplitConfig
from atoll.split.families import HeadKind, family_of
from atoll.split.models import VocabularyFacts, head_kind, load_task_model
from atoll.split.partition import Cut
from atoll.split.qa import read_squad, tokenize_qa
from atoll.split.tasks import QuestionAnsweringData, SplitData, TokenizedData


@dataclass
class SplitSetup:
    config: SplitConfig
    task: str
    head: HeadKind
    data: SplitData
    tokenizer: object
    test_indices: np.ndarray
    party_indices: list[np.ndarray]
    label_names: list[str]
    model: nn.Module  # the full task model as loaded (parties deep-copy and carve it)
    cut: Cut
    vocabulary: VocabularyFacts

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def planned_steps(self) -> list[int]:
        """Optimizer steps of each data party."""
        train = self.config.train
        if train.steps is not None:
            return [train.steps] * len(self.party_indices)
        return [max(1, math.ceil(train.epochs * len(ix) / train.batch_size)) for ix in self.party_indices]

    def hello_facts(self) -> dict:
        split = self.config.split
        return {
            "model": self.config.model.name,
            "partition": split.partition,
            "head_blocks": split.head_blocks,
            "tail_blocks": split.tail_blocks,
            "seed": self.config.seed,
            "head": self.head,
            "num_labels": self.num_labels,
            "vocabulary": self.vocabulary.to_dict(),
        }

    def majority_rate(self) -> float | None:
        if self.head != "classification":
            return None
        labels = self.data.partition_labels()[self.test_indices]
        return float(np.bincount(labels).max() / len(labels))


def _subset(count: int, max_examples: int | None, seed: int) -> np.ndarray | None:
    if max_examples is None or max_examples >= count:
        return None
    return np.sort(numpy_rng(seed, "subset").choice(count, size=max_examples, replace=False))


def _test_count(test_size: float, n: int) -> int:
    count = int(test_size) if test_size >= 1 else int(round(test_size * n))
    if count < 1 or count >= n:
        raise DataError(
            f"data.test_size={test_size} leaves {n - count} of {n} examples for training", "use a fraction in (0, 1) or a smaller count"
        )
    return count


def _load_tokenized(config: SplitConfig, cache_dir: Path) -> tuple[TokenizedData, object, list[str], RawData]:
    raw = load_source(config.data.source)
    spec = resolve_task(config.data, raw)
    check_model_for_task(config.model.name, spec.is_generative)
    keep = _subset(len(raw), config.data.max_examples, config.seed)
    subset_key = "all"
    if keep is not None:
        raw = RawData({k: [v[i] for i in keep] for k, v in raw.columns.items()}, raw.task, raw.defaults, raw.fingerprint, raw.description)
        subset_key = f"subset:{config.seed}:{config.data.max_examples}"
    tokenizer = load_tokenizer(config.model.name, lambda: spec.corpus(raw), cache_dir)
    tokenized: Tokenized = tokenize(spec, raw, tokenizer, config.model.max_length, cache_dir, subset_key)
    return TokenizedData(tokenized, int(tokenizer.pad_token_id), spec.kind), tokenizer, list(spec.label_names), raw


def _load_qa(config: SplitConfig, cache_dir: Path) -> tuple[QuestionAnsweringData, object]:
    examples = read_squad(config.data.source)
    keep = _subset(len(examples), config.data.max_examples, config.seed)
    if keep is not None:
        examples = [examples[i] for i in keep]
    tokenizer = load_tokenizer(config.model.name, lambda: [e.question + "\n" + e.context for e in examples], cache_dir)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"the tokenizer of '{config.model.name}' is not a fast tokenizer", "qa needs character offsets")
    return QuestionAnsweringData(tokenize_qa(examples, tokenizer, config.model.max_length), int(tokenizer.pad_token_id)), tokenizer


def prepare(config: SplitConfig) -> SplitSetup:
    """Load and check everything; raises AtollError subclasses on bad input."""
    check_model_name(config.model.name)
    cache_dir = Path(config.data.cache_dir).expanduser() if config.data.cache_dir else default_cache_dir()
    raw = None
    label_names: list[str] = []
    if config.data.task == "qa":
        data, tokenizer = _load_qa(config, cache_dir)
        task = "qa"
        groups = data.data.groups
    else:
        data, tokenizer, label_names, raw = _load_tokenized(config, cache_dir)
        task = data.task
        groups = np.arange(len(data))
    head = head_kind(task)
    if config.eval.max_generate and head != "causal-lm":
        raise ConfigError("eval.max_generate needs a generative task (sft, math)", "set eval.max_generate=0")

    # test set: whole groups (a QA context's questions stay together)
    unique = np.unique(groups)
    test_groups = numpy_rng(config.seed, "global-test").permutation(unique)[: _test_count(config.data.test_size, len(unique))]
    is_test = np.isin(groups, test_groups)
    test = np.flatnonzero(is_test)
    if config.eval.max_examples is not None:
        test = test[: config.eval.max_examples]
    pool = np.flatnonzero(~is_test)
    column_values = None
    if config.partition.column is not None:
        if raw is None or config.partition.column not in raw.columns:
            raise DataError(f"partition.column '{config.partition.column}' does not exist", "choose a column of the data source")
        column_values = [raw.columns[config.partition.column][i] for i in pool]
    labels = data.partition_labels()[pool]
    parts = partition(config.partition, config.split.data_parties, labels, numpy_rng(config.seed, "partition"), column_values)
    party_indices = [pool[p] for p in parts]

    vocabulary = VocabularyFacts.of(tokenizer)
    model = load_task_model(config.model.name, head, len(label_names), vocabulary, config.model.dtype, config.seed)
    family = family_of(model, head)
    cut = Cut(config.split.partition, config.split.head_blocks, config.split.tail_blocks, family.num_blocks())
    if head == "causal-lm" and not family.causal:
        raise ConfigError(f"'{config.model.name}' is an encoder and cannot generate", "use a causal LM for sft and math")
    from atoll.split.plugins import parse_plugin_params, plugin_class

    for index, item in enumerate(config.attacks):
        params = parse_plugin_params("attack", item.name, item.params(), f"attacks[{index}]")
        plugin_class("attack", item.name).check(params, config.split.partition, head)
    return SplitSetup(config, task, head, data, tokenizer, test, party_indices, label_names, model, cut, vocabulary)
