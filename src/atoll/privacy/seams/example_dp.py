"""Example-level DP-SGD inside every client, as a training hook of the federation's local loop.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep Learning with Differential
Privacy", CCS 2016. Per optimizer step: per-example gradients of the trained parameters (opacus'
hooks, Yousefpour et al. 2021, attached to the live model for the client's training), each
example's gradient g_i of its own mean loss clipped to C, summed, plus N(0, σ²C²), divided by the
step's examples B. The loop's loss is a batch mean (over tokens, for language models), so opacus'
summed per-example contributions are rescaled to each example's own mean loss first; what the
algorithm adds that does not come from the data (FedProx's proximal term, SCAFFOLD's correction)
is kept as it is. The optimizer and the loop's gradient-norm cap then act on the private gradient
(post-processing).

Accounting: a step samples B of the client's n examples, q = B/n. The loop draws batches by
shuffling, not by Poisson sampling, so the RDP accountant's ε (which assumes Poisson sampling) is
the usual approximation, not a proof (Chua et al., "How Private are DP-SGD Implementations?",
ICML 2024). The round record carries ``dpsgd_epsilon``: the largest ε over clients of one that took
part in every round so far, an upper bound for every client. The clients' sizes are read when a
round is recorded (the server's context): in a Flower run with node-local data they are what the
nodes reported.
"""

from __future__ import annotations

import torch

from typing import Callable

from atoll.errors import AlgorithmError
from atoll.fl.base import local_steps
from atoll.fl.stages import Stage
from atoll.fl.trainer import TrainHooks
from atoll.privacy.dp.accounting import epsilon_after
from atoll.seeding import torch_generator


class ExampleLevelDP(Stage):
    """DP-SGD on the trained parameters of each client's local steps (see the module docstring)."""

    name = "dp-sgd"

    def __init__(self, workbench, settings, config, client_sizes: Callable[[], list[int]], seed: int):
        self.workbench = workbench
        self.settings = settings
        self.seed = seed
        self.train = config.train
        self.grad_accum = config.train.grad_accum
        self.client_sizes = client_sizes
        self.rounds = 0
        self._hooks = None
        self._handle = None
        self._label_counts: list[torch.Tensor] = []
        self._client = -1
        self._round = 0
        self._step = 0

    # -- attaching opacus to the live model for one client's training ---------------------------------
    def training_hooks(self, round: int, client_id: int) -> TrainHooks:
        from opacus.grad_sample import GradSampleHooks

        self.detach()
        model = self.workbench.model
        self._hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=False)
        self._handle = model.register_forward_pre_hook(self._note_labels, with_kwargs=True)
        self._label_counts, self._client, self._round, self._step = [], client_id, round, 0
        return TrainHooks(after_backward=self.privatize)

    def before_upload(self, round, client_id, update, download):
        self.detach()
        return update

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.remove_hooks()
            self._hooks.set_grad_sample_to_none()
            for param in self.workbench.model.parameters():
                for attribute in ("_forward_counter", "_current_grad_sample"):
                    param.__dict__.pop(attribute, None)
            for module in self.workbench.model.modules():
                module.__dict__.pop("activations", None)  # not hasattr: PEFT wrappers forward attribute lookups
            self._hooks = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _note_labels(self, module, args, kwargs) -> None:
        labels = kwargs.get("labels")
        if labels is None or not module.training or not torch.is_grad_enabled():
            return
        if labels.dim() == 1:  # classification: one label per example
            self._label_counts.append(torch.ones(labels.shape[0], dtype=torch.float64))
        else:  # next-token prediction: the loss averages over the labelled tokens after the shift
            self._label_counts.append((labels[:, 1:] != -100).sum(dim=1).to(torch.float64))

    # -- the private step -------------------------------------------------------------------------------
    def privatize(self) -> None:
        """Replace the data part of every trained parameter's gradient by the DP-SGD step."""
        params = [p for p in self.workbench.model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return
        counts = self._label_counts
        self._label_counts = []
        if len(counts) != self.grad_accum:
            raise AlgorithmError(f"DP-SGD saw {len(counts)} forward passes for a step of {self.grad_accum} micro-batches")
        # example i of micro-batch b contributed raw_i = (1/grad_accum)(1/T_b) sum of its tokens' gradients
        scale = torch.cat([self.grad_accum * c.sum() / c.clamp_min(1) * (c > 0) for c in counts])
        samples = []
        for param in params:
            sample = getattr(param, "grad_sample", None)
            if sample is None:
                raise AlgorithmError(
                    f"DP-SGD: opacus computed no per-example gradient for a trained parameter of shape {tuple(param.shape)}",
                    "this algorithm trains a layer type opacus does not support",
                )
            sample = torch.cat(sample) if isinstance(sample, list) else sample
            samples.append(sample.to(torch.float64))
        examples = samples[0].shape[0]
        per_example = [s.reshape(examples, -1) * scale[:, None] for s in samples]
        norms = torch.sqrt(sum((g**2).sum(dim=1) for g in per_example))
        factors = (self.settings.max_grad_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
        generator = torch_generator(self.seed, "dp-sgd", self._client, self._round, self._step)
        self._step += 1
        stddev = self.settings.noise_multiplier * self.settings.max_grad_norm
        for param, sample, gradient in zip(params, samples, per_example):
            private = (factors[:, None] * gradient).sum(dim=0)
            if stddev > 0:
                private = private + torch.normal(0.0, stddev, private.shape, generator=generator, dtype=torch.float64)
            private = private / examples
            data_part = sample.sum(dim=0).reshape(-1)
            other = param.grad.detach().to(torch.float64).reshape(-1) - data_part  # what does not come from the data
            param.grad = (private + other).reshape(param.shape).to(param.grad.dtype)
            param.grad_sample = None

    # -- records ------------------------------------------------------------------------------------------
    def schedules(self) -> list[tuple[float, int]]:
        """(q, steps per round) of every client with training data: the worst one bounds everyone's ε."""
        train = self.train
        per_step = train.batch_size * train.grad_accum
        return sorted({(min(1.0, per_step / max(1, n)), local_steps(train, n)) for n in self.client_sizes() if n > 0})

    def after_aggregate(self, round: int, server) -> None:
        self.rounds = round

    def round_metrics(self, round: int) -> dict[str, float]:
        metrics = {"dpsgd_noise_multiplier": float(self.settings.noise_multiplier), "dpsgd_clip": float(self.settings.max_grad_norm)}
        sigma = self.settings.noise_multiplier
        schedules = self.schedules() if sigma > 0 and round > 0 else []
        if schedules:
            metrics["dpsgd_epsilon"] = max(
                epsilon_after(sigma, q, steps * round, self.settings.delta, self.settings.accountant) for q, steps in schedules
            )
            metrics["dpsgd_delta"] = float(self.settings.delta)
        return metrics
