"""RanText (InferDPT's random adjacency): for each token x, Laplace noise (scale Δf/ε per
coordinate, Δf the range of the embedding table's values) is added to its embedding; the distance
r of the noisy point from e_x sets a random adjacency list, the tokens within distance r of x
(itself included); the replacement is drawn from that list by the exponential mechanism with
utility 1 − ‖e_x − e_y‖/r: P(y | x) ∝ exp(ε·u/2) (Tong, Zhang, Mo, Cao, Wang and others,
"InferDPT: Privacy-Preserving Inference for Black-box Large Language Models", arXiv 2310.12214,
2023; VFLAIR-LLM's RanText). InferDPT's local "extraction" model that repairs the server's answer
is not part of this defense. Applied in training, evaluation and generation.
"""

from __future__ import annotations

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams
from atoll.split.defenses.token_sampling import candidate_ids, replace_tokens, sample_rows


class RanTextParams(DefenseParams):
    epsilon: float = Field(10.0, gt=0, description="privacy parameter (smaller: larger adjacency lists, flatter choice)")


class RanText(Defense):
    name = "rantext"
    paper = "Tong et al., InferDPT (RanText), arXiv 2310.12214 (2023)"
    summary = "replace each token from a random adjacency list (radius from Laplace noise) by the exponential mechanism"
    Params = RanTextParams

    def __init__(self, params: RanTextParams, context):
        super().__init__(params, context)
        self.candidates = candidate_ids(context)
        self.table = context.word_embeddings.float()
        self.range = float(self.table.max() - self.table.min())
        self.special = set(getattr(context.tokenizer, "all_special_ids", None) or [])
        self.calls = 0
        self.replaced = 0.0
        self.mean_list = 0.0

    def protect_tokens(self, batch, step, phase):
        import torch

        from atoll.seeding import torch_generator

        self.calls += 1
        generator = torch_generator(self.context.seed, self.name, self.context.party, phase, step, self.calls)
        scale = self.range / self.params.epsilon
        candidate_table = self.table[self.candidates]

        def choose(ids):
            uniform = torch.rand(len(ids), self.table.shape[1], generator=generator, dtype=torch.float64) - 0.5
            noise = -scale * torch.sign(uniform) * torch.log1p(-2 * uniform.abs().clamp(max=0.5 - 1e-12))
            radius = noise.norm(dim=-1).float().unsqueeze(-1)
            unique, inverse = ids.unique(return_inverse=True)
            distances = torch.cdist(self.table[unique], candidate_table)[inverse]
            inside = distances <= radius
            utility = torch.where(inside, 1 - distances / radius, torch.full_like(distances, float("-inf")))
            # x is always adjacent to itself: one extra column, and its candidate column (if any) dropped
            self_column = self.candidates.unsqueeze(0) == ids.unsqueeze(-1)
            utility = torch.where(self_column, torch.full_like(utility, float("-inf")), utility)
            utility = torch.cat([utility, torch.ones_like(utility[:, :1])], dim=-1)
            picked = sample_rows(0.5 * self.params.epsilon * utility, generator)
            out = torch.where(picked == len(self.candidates), ids, self.candidates[picked.clamp(max=len(self.candidates) - 1)])
            self.replaced = float((out != ids).float().mean())
            self.mean_list = float(inside.sum(-1).float().mean())
            return out

        return replace_tokens(batch, choose, self.special)

    def report(self) -> dict[str, float]:
        return {"replaced_share": self.replaced, "mean_adjacency": self.mean_list}
