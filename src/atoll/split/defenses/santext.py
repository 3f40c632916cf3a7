"""SanText+: text-level local DP before the head. A token x is replaced by y drawn with probability
∝ exp(−½·ε·‖e_x − e_y‖) over the candidate vocabulary (the exponential mechanism with the
embedding distance as utility: ε·d_χ-privacy for every pair of tokens at distance d). Sensitive
tokens (the ``sensitive`` share of the vocabulary, the rarest in the data party's text) are
always replaced; the others with probability ``p`` (Yue, Du, Wang, Li, Sun and Chow,
"Differential Privacy for Text Analytics via Natural Text Sanitization", Findings of ACL 2021;
VFLAIR-LLM's SanText). Applied in training, evaluation and generation.
"""

from __future__ import annotations

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams
from atoll.split.defenses.token_sampling import candidate_ids, replace_tokens, sample_rows


class SanTextParams(DefenseParams):
    epsilon: float = Field(3.0, gt=0, description="privacy parameter of the exponential mechanism (smaller: more random replacements)")
    sensitive: float = Field(0.5, ge=0, le=1, description="share of the vocabulary treated as sensitive (the rarest tokens)")
    p: float = Field(0.3, ge=0, le=1, description="probability of replacing a non-sensitive token")


class SanText(Defense):
    name = "santext"
    paper = "Yue et al., Differential Privacy for Text Analytics via Natural Text Sanitization (SanText+), Findings of ACL 2021"
    summary = "replace tokens by the exponential mechanism over embedding distance (rare tokens always, others with probability p)"
    Params = SanTextParams

    def __init__(self, params: SanTextParams, context):
        super().__init__(params, context)
        import torch

        self.candidates = candidate_ids(context)
        self.table = context.word_embeddings.float()
        self.special = set(getattr(context.tokenizer, "all_special_ids", None) or [])
        counts = context.token_counts() if context.token_counts is not None else None
        self.sensitive = torch.zeros(self.table.shape[0], dtype=torch.bool)
        if counts is not None:
            used = self.candidates[torch.from_numpy(counts[self.candidates.numpy()]).argsort(stable=True)]
            self.sensitive[used[: int(round(params.sensitive * len(used)))]] = True  # rarest first
        else:
            self.sensitive[self.candidates] = True
        self.calls = 0
        self.replaced = 0.0

    def protect_tokens(self, batch, step, phase):
        import torch

        from atoll.seeding import torch_generator

        self.calls += 1
        generator = torch_generator(self.context.seed, self.name, self.context.party, phase, step, self.calls)
        candidate_table = self.table[self.candidates]

        def choose(ids):
            out = ids.clone()
            draw = torch.rand(len(ids), generator=generator)
            change = self.sensitive[ids] | (draw < self.params.p)
            unique, inverse = ids[change].unique(return_inverse=True)
            if len(unique):
                distances = torch.cdist(self.table[unique], candidate_table)
                # every occurrence draws on its own, from its token's row
                out[change] = self.candidates[sample_rows(-0.5 * self.params.epsilon * distances[inverse], generator)]
            self.replaced = float((out != ids).float().mean())
            return out

        return replace_tokens(batch, choose, self.special)

    def report(self) -> dict[str, float]:
        return {"replaced_share": self.replaced}
