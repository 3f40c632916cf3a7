"""A lean torch training loop (AdamW, gradient accumulation, LR schedule) and task evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from atoll.data.batching import evaluation_batches, prompt_batch
from atoll.data.tasks import TaskSpec, Tokenized, extract_answer


@dataclass
class TrainHooks:
    """Algorithm hooks into the local loop (the loop itself never changes).

    ``extra_loss()`` is added to the task loss of every micro-batch (FedProx's proximal term);
    ``after_backward()`` may edit gradients before clipping and the step (SCAFFOLD's correction).
    """

    extra_loss: Callable[[], Tensor] | None = None
    after_backward: Callable[[], None] | None = None


def chain(first: TrainHooks, more: list[TrainHooks]) -> TrainHooks:
    """One TrainHooks running ``first``'s hooks, then each of ``more`` in order (protections' hooks
    after the algorithm's: a DP-SGD stage sees the algorithm's corrected gradient)."""
    if not more:
        return first
    every = [first, *more]
    losses = [h.extra_loss for h in every if h.extra_loss is not None]
    afters = [h.after_backward for h in every if h.after_backward is not None]

    def extra_loss() -> Tensor:
        total = losses[0]()
        for loss in losses[1:]:
            total = total + loss()
        return total

    def after_backward() -> None:
        for hook in afters:
            hook()

    return TrainHooks(extra_loss if losses else None, after_backward if afters else None)


@dataclass
class TrainPlan:
    steps: int
    lr: float
    grad_accum: int = 1
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    hooks: TrainHooks = field(default_factory=TrainHooks)
    optimizer: str = "adamw"  # or "sgd"


def lr_factor(step: int, plan: TrainPlan) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
    if plan.warmup_steps and step < plan.warmup_steps:
        return (step + 1) / plan.warmup_steps
    if plan.schedule == "constant":
        return 1.0
    span = max(1, plan.steps - plan.warmup_steps)
    progress = min(1.0, (step - plan.warmup_steps) / span)
    if plan.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_steps(model: nn.Module, params: list[nn.Parameter], batches: Iterator[dict[str, Tensor]], plan: TrainPlan) -> dict[str, float]:
    """Run ``plan.steps`` optimizer steps of AdamW (or SGD) on ``params``; return mean loss and counts."""
    model.train()
    if plan.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=plan.lr, weight_decay=plan.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay)
    total_loss = 0.0
    micro_batches = 0
    examples = 0
    tokens = 0
    for step in range(plan.steps):
        for group in optimizer.param_groups:
            group["lr"] = plan.lr * lr_factor(step, plan)
        for _ in range(plan.grad_accum):
            batch = next(batches)
            output = model(**batch)
            loss = output.loss
            total_loss += float(loss.detach())
            micro_batches += 1
            examples += int(batch["input_ids"].shape[0])
            tokens += int(batch["attention_mask"].sum())
            if plan.hooks.extra_loss is not None:
                loss = loss + plan.hooks.extra_loss()
            (loss / plan.grad_accum).backward()
        if plan.hooks.after_backward is not None:
            plan.hooks.after_backward()
        if plan.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, plan.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {"loss": total_loss / max(1, micro_batches), "steps": float(plan.steps), "examples": float(examples), "tokens": float(tokens)}


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    spec: TaskSpec,
    data: Tokenized,
    indices: np.ndarray,
    pad_id: int,
    batch_size: int,
    tokenizer=None,
    max_generate: int = 0,
    max_new_tokens: int = 64,
) -> dict[str, float]:
    """Task metrics of the live model on ``indices``: accuracy/macro-F1/loss for classification,
    answer loss and perplexity for sft, plus exact match by generation for math."""
    model.eval()
    if len(indices) == 0:
        return {}
    if spec.kind == "classification":
        return _evaluate_classifier(model, spec, data, indices, pad_id, batch_size)
    metrics = _evaluate_answer_loss(model, data, indices, pad_id, batch_size, spec.kind)
    if spec.kind == "math" and max_generate > 0 and tokenizer is not None:
        metrics.update(_evaluate_generation(model, data, indices[:max_generate], pad_id, batch_size, tokenizer, max_new_tokens))
    return metrics


def _evaluate_classifier(model, spec, data, indices, pad_id, batch_size) -> dict[str, float]:
    num_labels = spec.num_labels
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    loss_sum = 0.0
    for batch in evaluation_batches(data, indices, batch_size, pad_id, spec.kind):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        predicted = logits.argmax(-1).numpy()
        np.add.at(confusion, (batch["labels"].numpy(), predicted), 1)
    count = confusion.sum()
    true_positive = np.diag(confusion).astype(float)
    precision = np.divide(true_positive, confusion.sum(0), out=np.zeros(num_labels), where=confusion.sum(0) > 0)
    recall = np.divide(true_positive, confusion.sum(1), out=np.zeros(num_labels), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(num_labels), where=(precision + recall) > 0)
    present = confusion.sum(1) > 0
    accuracy = float(true_positive.sum() / count)
    return {
        "accuracy": accuracy,
        "accuracy_se": math.sqrt(accuracy * (1 - accuracy) / count),  # binomial standard error of the test-set accuracy
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "loss": loss_sum / count,
        "examples": float(count),
    }


def _evaluate_answer_loss(model, data, indices, pad_id, batch_size, kind) -> dict[str, float]:
    losses, hits, counts = [], [], []  # per example: summed token loss, correct tokens, tokens
    for batch in evaluation_batches(data, indices, batch_size, pad_id, kind):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none")
        losses.append((token_loss * mask).sum(1).double().numpy())
        hits.append(((logits[:, :-1].argmax(-1) == targets) & mask).sum(1).numpy())
        counts.append(mask.sum(1).numpy())
    loss_sums, correct, tokens = (np.concatenate(x).astype(np.float64) for x in (losses, hits, counts))
    loss = float(loss_sums.sum() / max(1.0, tokens.sum()))
    accuracy = float(correct.sum() / max(1.0, tokens.sum()))
    return {
        "loss": loss,
        "perplexity": float(math.exp(min(loss, 50.0))),
        "token_accuracy": accuracy,
        # tokens of one example are not independent: standard errors of the two token means
        # treat each example as one cluster (the ratio estimator's linearised variance)
        "loss_se": ratio_standard_error(loss_sums, tokens),
        "token_accuracy_se": ratio_standard_error(correct, tokens),
        "tokens": float(tokens.sum()),
        "examples": float(len(indices)),
    }


def ratio_standard_error(numerators: np.ndarray, denominators: np.ndarray) -> float:
    """Standard error of R = sum(y) / sum(n) over independent examples i with totals y_i over n_i
    tokens: sqrt(n/(n-1) * sum((y_i - R n_i)^2)) / sum(n) (Cochran, Sampling Techniques, 6.9)."""
    count, total = len(numerators), float(denominators.sum())
    if count < 2 or total == 0:
        return float("nan")
    ratio = numerators.sum() / total
    return float(math.sqrt(count / (count - 1) * float(((numerators - ratio * denominators) ** 2).sum())) / total)


def _evaluate_generation(model, data, indices, pad_id, batch_size, tokenizer, max_new_tokens) -> dict[str, float]:
    correct = 0
    flexible = 0
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        batch = prompt_batch(data, chunk, pad_id)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for index, text in zip(chunk, texts):
            gold = data.answers[index]
            strict = extract_answer(text, strict=True)
            loose = extract_answer(text)
            correct += int(strict is not None and strict == gold)
            flexible += int(loose is not None and loose == gold)
    # exact_match requires the '#### N' answer format (a random model rarely emits it by chance);
    # exact_match_flexible also accepts the last number in the text
    return {"exact_match": correct / len(indices), "exact_match_flexible": flexible / len(indices), "generated": float(len(indices))}
