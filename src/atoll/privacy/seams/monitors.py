"""The success rate of a targeted attack on the global model, recorded with the round's metrics.

- backdoor (Bagdasaryan et al., AISTATS 2020): on global-test examples with the trigger inserted
  (classification: those whose true label is not the target), the fraction the global model maps
  to the target: the target label, or for generative tasks the whole target response under
  teacher forcing (every target token the argmax given the ones before it: exactly what greedy
  decoding would produce);
  beside it, the same rate on the examples without the trigger (what the model does anyway);
- targeted label flipping (Tolpegin et al., ESORICS 2020): on global-test examples of the source
  class, the fraction predicted as the target class.

A server-side observer: it changes nothing in the run, and measures at the rounds the run evaluates,
on the global model as released (after any DP noise).
"""

from __future__ import annotations

import numpy as np
import torch

from atoll.data.batching import collate
from atoll.fl.stages import Stage
from atoll.privacy.seams.behaviours import trigger_tokens
from atoll.privacy.seams.poisoned_data import with_triggered
from atoll.seeding import numpy_rng


class AttackSuccess(Stage):
    """Measures ``attack_success_rate`` of a backdoor or a targeted label flip."""

    name = "attack-success"

    def __init__(self, experiment, settings):
        self.experiment = experiment
        self.settings = settings
        self.config = experiment.config
        spec, data, test = experiment.spec, experiment.data, experiment.splits.global_test
        self.generative = spec.is_generative
        if settings.kind == "backdoor":
            backdoor = settings.backdoor
            pool = test if self.generative else test[data.labels[test] != backdoor.target_label]
            count = min(len(pool), backdoor.eval_examples)
            chosen = np.sort(numpy_rng(self.config.seed, "backdoor-eval").choice(pool, size=count, replace=False))
            trigger, target = trigger_tokens(experiment, backdoor)
            length = self.config.model.max_length
            self.sets = {
                "attack_success_rate": with_triggered(data, chosen, trigger, target, backdoor.target_label, length),
                # the control: the same examples without the trigger (for generative tasks, the target response after them)
                "attack_target_rate_untriggered": with_triggered(data, chosen, [], target, backdoor.target_label, length)
                if self.generative
                else (data, chosen),
            }
            self.target = backdoor.target_label
        else:
            flip = settings.label_flip
            self.sets = {"attack_success_rate": (data, test[data.labels[test] == flip.source])}
            self.target = flip.target

    @torch.no_grad()
    def target_rate(self, state, data, indices: np.ndarray) -> float:
        """The fraction of ``indices`` of ``data`` the model of ``state`` maps to the target."""
        workbench = self.experiment.workbench
        workbench.load(state)
        model = workbench.model
        model.eval()
        hits = 0
        kind = self.experiment.spec.kind
        for start in range(0, len(indices), self.config.eval.batch_size):
            chunk = indices[start : start + self.config.eval.batch_size]
            batch = collate(data, chunk, workbench.pad_id, kind)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if not self.generative:
                hits += int((logits.argmax(-1) == self.target).sum())
                continue
            predicted = logits[:, :-1].argmax(-1)
            labels = batch["labels"][:, 1:]
            scored = labels != -100
            hits += int(((predicted == labels) | ~scored).all(dim=1).sum())
        return hits / max(1, len(indices))

    def round_metrics(self, round: int) -> dict[str, float]:
        """At the rounds the run evaluates, on the global model as released (after any DP noise)."""
        if round != self.config.federation.rounds and round % self.config.eval.every:
            return {}
        state = self.experiment.server.global_state
        metrics = {name: self.target_rate(state, data, indices) for name, (data, indices) in self.sets.items()}
        metrics["attack_success_examples"] = float(len(self.sets["attack_success_rate"][1]))
        return metrics
