"""RanText (InferDPT's random adjacency): for each word x, Laplace noise of scale Δf/ε per
coordinate (Δf the range of the word-embedding values) is added to its embedding; the distance r
of the noisy point from e_x sets a random adjacency list, the corpus words within distance r of x
(and always x's nearest corpus word: x itself when it is one), so a smaller ε gives longer lists;
the replacement is drawn from that list by the exponential mechanism with utility
u = 1 − ‖e_x − e_y‖/r: P(y | x) ∝ exp(ε·u/2) (Tong, Zhang, Mo, Cao, Wang and others, "InferDPT:
Privacy-Preserving Inference for Black-box Large Language Models", arXiv 2310.12214, 2023;
VFLAIR-LLM's RanText). InferDPT's local "extraction" model that repairs the server's answer is not
part of this defense. Words, the corpus vocabulary, word embeddings and the one deviation (the list
holds only corpus words of x's form: the same number of sub-tokens, leading space and kind of
characters) are in ``words.py``. Applied in training, evaluation and generation.
"""

from __future__ import annotations

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams
from atoll.split.defenses.words import CorpusWords, by_form, sample_rows


class RanTextParams(DefenseParams):
    epsilon: float = Field(10.0, gt=0, description="privacy parameter (smaller: larger adjacency lists, flatter choice)")


class RanText(Defense):
    name = "rantext"
    paper = "Tong et al., InferDPT (RanText), arXiv 2310.12214 (2023)"
    summary = "replace each word from a random adjacency list (radius from Laplace noise) by the exponential mechanism"
    Params = RanTextParams

    def __init__(self, params: RanTextParams, context):
        super().__init__(params, context)
        self.vocabulary = CorpusWords(context)
        table = self.vocabulary.embeddings
        self.range = float(table.max() - table.min()) if len(table) else 1.0
        self.calls = 0
        self.replaced = 0.0
        self.mean_list = 0.0

    def radii(self, count: int, generator):
        """``count`` random radii: the norm of a vector of Laplace(Δf/ε) coordinates."""
        import torch

        uniform = torch.rand(count, self.vocabulary.embeddings.shape[1], generator=generator, dtype=torch.float64) - 0.5
        noise = -(self.range / self.params.epsilon) * torch.sign(uniform) * torch.log1p(-2 * uniform.abs().clamp(max=0.5 - 1e-12))
        return noise.norm(dim=-1).float().clamp_min(1e-12)

    def logits(self, distances, radius):
        """The exponential mechanism's log-weights over one form's candidates ([n, C]) given each
        occurrence's distances and radius ([n, 1]): −inf outside the adjacency list."""
        import torch

        nearest = distances == distances.min(dim=-1, keepdim=True).values
        inside = (distances <= radius) | nearest
        utility = 1 - distances / radius
        return torch.where(inside, 0.5 * self.params.epsilon * utility, torch.full_like(utility, float("-inf"))), inside

    def choose(self, words, generator):
        import torch

        vocabulary = self.vocabulary
        out = list(words)
        sizes = []
        for form, positions in by_form(words, vocabulary).items():
            if form is None:
                for i in positions:
                    out[i] = vocabulary.fallback(words[i])
                continue
            candidates = vocabulary.groups[form]
            points = torch.stack([vocabulary.embedding_of(words[i]) for i in positions])
            distances = torch.cdist(points, vocabulary.embeddings[candidates])
            logits, inside = self.logits(distances, self.radii(len(positions), generator).unsqueeze(-1))
            picked = candidates[sample_rows(logits, generator)]
            sizes += inside.sum(-1).tolist()
            for i, j in zip(positions, picked.tolist()):
                out[i] = vocabulary.words[j]
        self.mean_list = sum(sizes) / len(sizes) if sizes else 0.0
        return out

    def protect_tokens(self, batch, step, phase):
        from atoll.seeding import torch_generator

        self.calls += 1
        generator = torch_generator(self.context.seed, self.name, self.context.party, phase, step, self.calls)
        batch, self.replaced = self.vocabulary.sanitize(batch, lambda words: self.choose(words, generator))
        return batch

    def report(self) -> dict[str, float]:
        return {"replaced_share": self.replaced, "mean_adjacency": self.mean_list}
