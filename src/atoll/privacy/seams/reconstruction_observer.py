"""The server as an attacker: rebuilding a client's training text from what it sees of its update.

Threat model: an honest-but-curious server. It follows the protocol, knows the adapter it sent,
and sees each client's upload, unless secure aggregation hides it, in which case it attacks the
sum it learns (:class:`~atoll.privacy.seams.aggregation.Release`). Central
DP does not hide an update from the server that adds the noise; example-level DP-SGD does change
what it sees. Methods (:mod:`atoll.privacy.attacks.reconstruction`): DAGER's span test on the
adapted ``module`` of layers 0 and 1 (Petrov et al., NeurIPS 2024; exact while the round's
training tokens fit in the LoRA rank and the update is a sum of gradients, as with ``train.
optimizer: sgd``; the first token is searched in the whole vocabulary), or LAMP-style gradient matching for
a single sequence of known length (Balunović et al., NeurIPS 2022).

Scores (ROUGE-1/2/L F1 and exact match, Lin 2004) compare every sequence the victim trained on in
that round (its batches, regenerated from the run's seed) with the best-matching recovered text.
"""

from __future__ import annotations

import re

import torch

from atoll.data.batching import training_batches
from atoll.fl.stages import Stage
from atoll.fl.state import AdapterState, Update
from atoll.models.adapters import PEFT_PREFIX
from atoll.privacy.attacks.reconstruction.dager import DagerAttack, LoRAGradient
from atoll.privacy.attacks.reconstruction.lamp import LampAttack, LampPlan
from atoll.privacy.attacks.rouge import rouge_l, rouge_n
from atoll.privacy.messages import model_delta
from atoll.seeding import numpy_rng


class ReconstructionObserver(Stage):
    """Attacks the victim's update in the chosen rounds; its scores join the round's record."""

    name = "reconstruction"

    def __init__(self, experiment, settings, sees_individual_updates: bool):
        self.experiment = experiment
        self.settings = settings
        self.individual = sees_individual_updates
        self.results: dict[int, dict[str, float]] = {}

    # -- what the server sees -------------------------------------------------------------------------
    def on_receive(self, round: int, update: Update) -> str | None:
        if round not in self.settings.rounds:
            return None
        server = self.experiment.server
        if update.client_id == self.settings.victim and self.individual:
            download = server.configure(round, update.client_id)
            self.attack(round, model_delta(update.state, download, update.client_id), download, individual=True)
        return None

    def on_release(self, release) -> None:
        """Secure aggregation on this engine: the server attacks the sum it learned."""
        if release.round in self.settings.rounds and self.settings.victim in release.clients:
            self.attack(release.round, release.change, release.download, individual=False)

    # -- the attack -------------------------------------------------------------------------------------
    def victim_sequences(self, round: int) -> list[list[int]]:
        """The token sequences the victim trained on in ``round`` (its batches, regenerated)."""
        experiment, victim = self.experiment, self.settings.victim
        client, workbench, config = experiment.clients[victim], experiment.workbench, experiment.config
        plan = client.plan(round)
        batches = training_batches(
            workbench.data,
            client.context.train_indices,
            config.train.batch_size,
            workbench.pad_id,
            experiment.spec.kind,
            numpy_rng(config.seed, "batches", victim, round),
            config.train.group_by_length,
        )
        sequences = []
        for _ in range(plan.steps * plan.grad_accum):
            batch = next(batches)
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                sequence = ids[mask.bool()].tolist()
                if sequence not in sequences:
                    sequences.append(sequence)
        return sequences

    def attack(self, round: int, change: dict[str, torch.Tensor], download: AdapterState, individual: bool) -> None:
        experiment = self.experiment
        workbench, tokenizer = experiment.workbench, experiment.workbench.tokenizer
        references = self.victim_sequences(round)
        workbench.load(download)
        model = workbench.model
        if self.settings.method == "dager":
            predicted = self.dager(model, change, download, tokenizer)
        else:
            predicted = self.lamp(model, change, references, tokenizer)
        texts = [tokenizer.decode(sequence, skip_special_tokens=True) for sequence in predicted]
        truths = [tokenizer.decode(sequence, skip_special_tokens=True) for sequence in references]
        scores = score(texts, truths)
        scores.update({"reconstruction_sequences": float(len(truths)), "reconstruction_individual_update": float(individual)})
        self.results[round] = scores

    def modules(self, download: AdapterState) -> tuple[str, str]:
        """The keys of the adapted ``module`` in layers 0 and 1."""
        found = {}
        for key in download.lora:
            match = re.search(r"layers?\.(\d+)\.", key)
            if match and key.endswith(self.settings.module) and int(match.group(1)) in (0, 1):
                found[int(match.group(1))] = key
        if set(found) != {0, 1}:
            from atoll.errors import ConfigError

            raise ConfigError(
                f"attack.reconstruction.module '{self.settings.module}' is not LoRA-adapted in layers 0 and 1",
                "adapt it (model.lora.target_modules) or name another",
            )
        return found[0], found[1]

    def dager(self, model, change: dict[str, torch.Tensor], download: AdapterState, tokenizer) -> list[list[int]]:
        first_key, second_key = self.modules(download)

        def view(key: str) -> LoRAGradient:
            return LoRAGradient(-change[f"lora.{key}.A"], -change[f"lora.{key}.B"], download.lora[key].A.detach())

        vocab = model.get_input_embeddings().num_embeddings
        attack = DagerAttack(model, PEFT_PREFIX + first_key, PEFT_PREFIX + second_key, vocab)
        # the first token is searched in the whole vocabulary: a truncated sequence need not start with BOS
        result = attack.reconstruct(view(first_key), view(second_key), self.settings.max_length, None)
        return result.sequences

    def lamp(self, model, change: dict[str, torch.Tensor], references: list[list[int]], tokenizer) -> list[list[int]]:
        """One sequence of the reference's length (LAMP assumes a batch of one, length known)."""
        live = self.experiment.workbench.active
        by_param = {}
        for key, (A, B, _) in live.lora.items():
            by_param[id(A)], by_param[id(B)] = f"lora.{key}.A", f"lora.{key}.B"
        names, observed = [], {}
        for name, param in model.named_parameters():
            key = by_param.get(id(param))
            if key is not None and key in change:
                names.append(name)
                observed[name] = -change[key]
        base = model.get_base_model()
        previous = base.config._attn_implementation
        base.set_attn_implementation("eager")
        try:
            plan = LampPlan(steps=self.settings.lamp_steps, seed=self.experiment.config.seed)
            reference = references[0]
            return [LampAttack(model, names, observed, plan).reconstruct(len(reference), reference[0])]
        finally:
            base.set_attn_implementation(previous)

    def round_metrics(self, round: int) -> dict[str, float]:
        return self.results.pop(round, {})


def score(predicted: list[str], truths: list[str]) -> dict[str, float]:
    """Mean over true texts of ROUGE-1/2/L F1 against the best-matching recovered text (by ROUGE-L),
    and the fraction recovered exactly (as lowercased words)."""
    totals = {"reconstruction_rouge1": 0.0, "reconstruction_rouge2": 0.0, "reconstruction_rougeL": 0.0, "reconstruction_exact": 0.0}
    for truth in truths:
        best = max(predicted, key=lambda text: rouge_l(text, truth), default="")
        totals["reconstruction_rouge1"] += rouge_n(best, truth, 1)
        totals["reconstruction_rouge2"] += rouge_n(best, truth, 2)
        totals["reconstruction_rougeL"] += rouge_l(best, truth)
        totals["reconstruction_exact"] += float(best.lower().split() == truth.lower().split() and bool(truth.split()))
    return {key: value / max(1, len(truths)) for key, value in totals.items()}
