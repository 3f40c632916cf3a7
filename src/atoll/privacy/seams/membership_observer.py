"""Membership inference against the run's final models, recorded with the last round's metrics.

Threat model: whoever receives a released model (the global adapter, or one client's own model)
queries it for the probabilities of candidate texts and decides which were trained on. Two targets:

- the global model: members are training examples of the federation's clients, non-members are
  held-out global-test examples;
- the victim's own model (its personal adapter for personalized algorithms, the global model
  otherwise): members are the victim's training examples, non-members its own held-out examples
  (same role, same distribution).

Scores (:mod:`atoll.privacy.attacks.membership`): loss (Yeom et al., CSF 2018), zlib-calibrated
loss (Carlini et al., USENIX Security 2021), Min-K% probability (Shi et al., ICLR 2024) and the
likelihood ratio against a reference model: the run's initial adapter, the model before federated
fine-tuning (Carlini et al. 2021; Mireshghallah et al., EMNLP 2022); each as ROC AUC and TPR at
``fpr``. Language models are scored on the tokens their loss trains (the response), classifiers
on log p(label | text).
"""

from __future__ import annotations

import numpy as np
import torch

from atoll.data.batching import collate
from atoll.fl.stages import Stage
from atoll.privacy.attacks.membership import loss_score, min_k_score, reference_score, roc_auc, tpr_at_fpr, zlib_score
from atoll.seeding import numpy_rng


class MembershipObserver(Stage):
    """Scores membership at the final round (see the module docstring)."""

    name = "membership"

    def __init__(self, experiment, settings, personal_state_here: bool):
        self.experiment = experiment
        self.settings = settings
        self.personal_state_here = personal_state_here  # Flower keeps personal adapters on the nodes
        config, splits = experiment.config, experiment.splits
        rng = numpy_rng(config.seed, "membership")

        def sample(indices: np.ndarray) -> np.ndarray:
            indices = np.asarray(indices)
            count = min(len(indices), settings.examples)
            return np.sort(rng.choice(indices, size=count, replace=False)) if count else indices

        pooled = np.concatenate([splits.client_train[c] for c in experiment.real_client_ids])
        self.global_sets = (sample(pooled), sample(splits.global_test))
        victim = settings.victim
        self.victim_sets = (sample(splits.client_train[victim]), sample(splits.client_test[victim]))

    def round_metrics(self, round: int) -> dict[str, float]:
        if round != self.experiment.config.federation.rounds:
            return {}
        experiment = self.experiment
        server = experiment.server
        reference = server.context.initial_state(server.context.global_rank)
        metrics = self.attack("membership_global", server.global_state, reference, *self.global_sets)
        victim = self.settings.victim
        if self.personal_state_here or not server.capabilities.personal:
            client = experiment.clients[victim]
            own = client.evaluation_state(server.configure(round, victim))
            metrics.update(self.attack("membership_victim", own, server.context.initial_state(client.context.rank), *self.victim_sets))
        return metrics

    def attack(self, prefix: str, target, reference, members: np.ndarray, others: np.ndarray) -> dict[str, float]:
        if len(members) < 2 or len(others) < 2:
            return {}
        target_lp = self.log_probs(target, np.concatenate([members, others]))
        reference_lp = self.log_probs(reference, np.concatenate([members, others]))
        texts = self.texts(np.concatenate([members, others]))
        scores = {
            "loss": loss_score(target_lp),
            "zlib": zlib_score(target_lp, texts),
            "mink": min_k_score(target_lp),
            "reference": reference_score(target_lp, reference_lp),
        }
        split = len(members)
        result = {f"{prefix}_examples": float(min(len(members), len(others)))}
        for name, values in scores.items():
            result[f"{prefix}_{name}_auc"] = roc_auc(values[:split], values[split:])
            result[f"{prefix}_{name}_tpr"] = tpr_at_fpr(values[:split], values[split:], self.settings.fpr)
        return result

    @torch.no_grad()
    def log_probs(self, state, indices: np.ndarray) -> list[torch.Tensor]:
        """Per example: log-probabilities of its trained tokens (LM), or of its label (classifier)."""
        experiment = self.experiment
        workbench = experiment.workbench
        workbench.load(state)
        model, kind = workbench.model, experiment.spec.kind
        model.eval()
        result = []
        size = experiment.config.eval.batch_size
        for start in range(0, len(indices), size):
            batch = collate(workbench.data, indices[start : start + size], workbench.pad_id, kind)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            if kind == "classification":
                chosen = torch.log_softmax(logits, dim=-1).gather(-1, batch["labels"][:, None])
                result.extend(chosen[row] for row in range(chosen.shape[0]))
                continue
            labels = batch["labels"][:, 1:]
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
            for row in range(labels.shape[0]):
                keep = labels[row] != -100
                result.append(log_probs[row][keep] if bool(keep.any()) else torch.zeros(1))
        return result

    def texts(self, indices: np.ndarray) -> list[str]:
        workbench = self.experiment.workbench
        data = workbench.data
        return [
            workbench.tokenizer.decode(data.sequence(int(i))[int(data.prompt_len[i]) :], skip_special_tokens=True) or " " for i in indices
        ]
