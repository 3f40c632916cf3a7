"""Membership inference: was this text in the training data of the model (or the adapter)?

Threat model: the attacker queries the released model (global model, or one client's personal
adapter) for token log-probabilities of candidate texts, and for the reference attack also holds a
reference model trained on similar data without the candidates. A higher score means "member".

- loss: −mean NLL (Yeom, Giacomelli, Fredrikson, Jha, "Privacy Risk in Machine Learning", CSF 2018).
- zlib: −NLL / zlib-compressed length, calibrating for how predictable a text is in general
  (Carlini et al., "Extracting Training Data from Large Language Models", USENIX Security 2021).
- Min-K% Prob: mean log-probability of the k% least likely tokens (Shi et al., "Detecting
  Pretraining Data from Large Language Models", ICLR 2024).
- reference: −(NLL_target − NLL_reference), a likelihood ratio against a reference model
  (Carlini et al. 2021; Mireshghallah et al., "Quantifying Privacy Risks of Masked Language Models
  Using Membership Inference Attacks", EMNLP 2022).

Metrics: ROC AUC, and TPR at a low FPR (Carlini et al., "Membership Inference Attacks From First
Principles", S&P 2022, argue that the low-FPR regime is what matters).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import Tensor, nn


@torch.no_grad()
def token_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, batch_size: int = 32) -> list[Tensor]:
    """log p(x_t | x_<t) of every real token after the first, one tensor per sequence."""
    model.eval()
    result: list[Tensor] = []
    for start in range(0, input_ids.shape[0], batch_size):
        ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        valid = mask[:, 1:].bool()
        result.extend(log_probs[row][valid[row]] for row in range(ids.shape[0]))
    return result


@torch.no_grad()
def classifier_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, batch_size: int = 64) -> list[Tensor]:
    """log p(label | text) of a sequence classifier, one 1-element tensor per example (so the
    loss and reference scores apply to classifiers as they do to language models)."""
    model.eval()
    result: list[Tensor] = []
    for start in range(0, input_ids.shape[0], batch_size):
        part = slice(start, start + batch_size)
        logits = model(input_ids=input_ids[part], attention_mask=attention_mask[part]).logits.float()
        chosen = torch.log_softmax(logits, dim=-1).gather(-1, labels[part, None])
        result.extend(chosen[row] for row in range(chosen.shape[0]))
    return result


def loss_score(log_probs: list[Tensor]) -> np.ndarray:
    return np.array([float(lp.mean()) for lp in log_probs])


def zlib_score(log_probs: list[Tensor], texts: list[str]) -> np.ndarray:
    return np.array([float(lp.mean()) / len(zlib.compress(text.encode("utf-8"))) for lp, text in zip(log_probs, texts)])


def min_k_score(log_probs: list[Tensor], k: float = 0.2) -> np.ndarray:
    scores = []
    for lp in log_probs:
        count = max(1, int(round(k * lp.numel())))
        scores.append(float(lp.sort().values[:count].mean()))
    return np.array(scores)


def reference_score(target_log_probs: list[Tensor], reference_log_probs: list[Tensor]) -> np.ndarray:
    return loss_score(target_log_probs) - loss_score(reference_log_probs)


def roc_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counted half (Mann–Whitney U)."""
    members = np.asarray(member_scores, dtype=np.float64)[:, None]
    others = np.asarray(nonmember_scores, dtype=np.float64)[None, :]
    return float((members > others).mean() + 0.5 * (members == others).mean())


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr: float = 0.01) -> float:
    """The largest fraction of members scored above a threshold that at most ``fpr`` of non-members pass."""
    others = np.sort(np.asarray(nonmember_scores, dtype=np.float64))[::-1]
    allowed = int(np.floor(fpr * len(others)))
    threshold = others[allowed] if allowed < len(others) else -np.inf
    return float((np.asarray(member_scores, dtype=np.float64) > threshold).mean())
