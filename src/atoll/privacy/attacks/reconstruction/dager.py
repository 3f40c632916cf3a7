"""DAGER-style exact reconstruction of a client's text from its LoRA gradient.

Petrov, Dimitrov, Baader, Müller, Vechev, "DAGER: Exact Gradient Inversion for Large Language
Models", NeurIPS 2024. The gradient of a linear layer W fed inputs x_t is Σ_t δ_t x_tᵀ, so its row
space lies in span{x_t}. For LoRA, ∂L/∂A = s·Σ_t (Bᵀδ_t) x_tᵀ lies in span{x_t} and
∂L/∂B = s·Σ_t δ_t (A x_t)ᵀ in span{A x_t}. When the batch has fewer tokens than the rank allows
(T ≤ r, and T < the input width), the span is exactly the inputs' span, and membership is a test:

1. Token test (first layer): the first layer's input for token v does not depend on its position
   in a rotary-position model (Llama, Qwen2), so every vocabulary token whose input lies in the
   span of the first layer's gradient (relative residual below ``tolerance``) was in the batch.
2. Sequence test (second layer, decoders): the second layer's input at position i depends on the
   tokens 0..i only, so prefixes grow one token at a time, keeping each extension by a candidate
   token whose second-layer input lies in the span of the second layer's gradient.

Threat model: an honest-but-curious server that knows the weights it sent and sees one client's
gradient (FedSGD) or a one-step update. Limits, as in the paper: exact only while T ≤ r and T is
below the layer width; noise (DP) makes the gradient full rank and breaks the test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from atoll.privacy.attacks.reconstruction.layer_inputs import last_position_inputs


@dataclass
class LoRAGradient:
    """The server's view of one LoRA module: the gradients of A and B and the A it sent."""

    grad_A: Tensor
    grad_B: Tensor
    A: Tensor


def row_space(matrix: Tensor, rank_tolerance: float) -> Tensor:
    """Orthonormal basis (k x n) of the row space of ``matrix``, dropping singular values below tol·σ_max."""
    _, singular, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    if singular.numel() == 0 or float(singular[0]) == 0.0:
        return vh[:0]
    return vh[singular > rank_tolerance * singular[0]]


def span_residuals(basis: Tensor, points: Tensor) -> Tensor:
    """‖x − P x‖ / ‖x‖ for each row x of ``points`` (P: projection onto the rows of ``basis``)."""
    points = points.to(torch.float64)
    projected = (points @ basis.T) @ basis
    norms = torch.linalg.vector_norm(points, dim=1)
    residuals = torch.linalg.vector_norm(points - projected, dim=1) / norms.clamp_min(1e-30)
    return torch.where(norms > 0, residuals, torch.ones_like(residuals))  # a zero input (padding) is no evidence


class SpanTest:
    """Membership of layer inputs in the span of one LoRA module's gradient (∂A, else ∂B)."""

    def __init__(self, gradient: LoRAGradient, rank_tolerance: float):
        self.use_A = float(gradient.grad_A.abs().max()) > 0
        matrix = gradient.grad_A if self.use_A else gradient.grad_B
        self.basis = row_space(matrix, rank_tolerance)
        self.projection = None if self.use_A else gradient.A.to(torch.float64)

    @property
    def full(self) -> bool:
        """The span is the whole input space: every input passes, the test tells nothing (T ≥ width)."""
        return self.basis.shape[0] >= self.basis.shape[1]

    def residuals(self, inputs: Tensor) -> Tensor:
        inputs = inputs.to(torch.float64)
        return span_residuals(self.basis, inputs if self.projection is None else inputs @ self.projection.T)


@dataclass
class DagerResult:
    tokens: list[int]  # candidate tokens of the first layer, best first
    sequences: list[list[int]]


class DagerAttack:
    """Recovers the token sequences of a batch from the gradients of two consecutive LoRA modules
    (e.g. q_proj of layers 0 and 1) of a causal LM with rotary positions."""

    def __init__(
        self,
        model: nn.Module,
        first_module: str,
        second_module: str,
        vocab_size: int,
        tolerance: float = 1e-3,
        rank_tolerance: float = 1e-6,
        max_prefixes: int = 64,
    ):
        self.model = model
        self.first_module = first_module
        self.second_module = second_module
        self.vocab_size = vocab_size
        self.tolerance = tolerance
        self.rank_tolerance = rank_tolerance
        self.max_prefixes = max_prefixes

    def token_candidates(self, first: LoRAGradient) -> list[int]:
        """Tokens whose first-layer input lies in the span of the first module's gradient."""
        test = SpanTest(first, self.rank_tolerance)
        inputs = last_position_inputs(self.model, self.first_module, [[v] for v in range(self.vocab_size)])
        residuals = test.residuals(inputs)
        order = torch.argsort(residuals)
        return [int(v) for v in order if float(residuals[v]) < self.tolerance]

    def reconstruct(self, first: LoRAGradient, second: LoRAGradient, max_length: int, first_tokens: list[int] | None = None) -> DagerResult:
        """Grow sequences from the candidate tokens. The query at position 0 (it attends only to
        itself) and every input of the last position (no loss reads its output) get no gradient,
        so the first token is searched in ``first_tokens`` (default: the whole vocabulary) by the
        test of the second position, and the last token of a sequence stays unrecovered. A gradient
        whose span fills its input space (more tokens than the rank) gives no result."""
        test = SpanTest(second, self.rank_tolerance)
        if SpanTest(first, self.rank_tolerance).full or test.full:  # more tokens than the rank: no test, and no result
            return DagerResult([], [])
        candidates = self.token_candidates(first)
        starts = list(range(self.vocab_size)) if first_tokens is None else list(first_tokens)
        prefixes: list[list[int]] = [[token] for token in starts]
        finished: list[list[int]] = []
        for _ in range(max_length - 1):
            extensions = [prefix + [token] for prefix in prefixes for token in candidates]
            if not extensions:
                break
            residuals = test.residuals(last_position_inputs(self.model, self.second_module, extensions))
            passing = sorted((float(r), i) for i, r in enumerate(residuals) if float(r) < self.tolerance)
            kept = [extensions[i] for _, i in passing[: self.max_prefixes]]
            grown = {tuple(e[:-1]) for e in kept}
            if len(prefixes[0]) > 1:  # a one-token start was never tested: it is no result on its own
                finished.extend(p for p in prefixes if tuple(p) not in grown)
            prefixes = kept
            if not prefixes:
                break
        finished.extend(p for p in prefixes if len(p) > 1)
        return DagerResult(candidates, finished)
