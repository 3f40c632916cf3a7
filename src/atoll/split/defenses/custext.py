"""CusText: each token may only become one of its K nearest tokens (by cosine similarity of their
embeddings, itself included), drawn by the exponential mechanism with the similarity normalised to
[0, 1] inside that set as utility: P(y | x) ∝ exp(ε·u(x, y)/2) (Chen, Li, Zhang, Lu, Yu and others,
"A Customized Text Sanitization Mechanism with Differential Privacy", Findings of ACL 2023;
VFLAIR-LLM's CusText). Applied in training, evaluation and generation.
"""

from __future__ import annotations

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams
from atoll.split.defenses.token_sampling import candidate_ids, replace_tokens, sample_rows


class CusTextParams(DefenseParams):
    epsilon: float = Field(3.0, gt=0, description="privacy parameter (smaller: replacements further from uniform-over-top-K less likely)")
    top_k: int = Field(20, gt=1, description="size of each token's customised output set")


class CusText(Defense):
    name = "custext"
    paper = "Chen et al., A Customized Text Sanitization Mechanism with Differential Privacy, Findings of ACL 2023"
    summary = "replace each token by one of its top_k most similar tokens, drawn by the exponential mechanism"
    Params = CusTextParams

    def __init__(self, params: CusTextParams, context):
        super().__init__(params, context)
        from torch.nn import functional as F

        self.candidates = candidate_ids(context)
        self.unit = F.normalize(context.word_embeddings.float(), dim=-1)
        self.special = set(getattr(context.tokenizer, "all_special_ids", None) or [])
        self.cache: dict[int, tuple] = {}
        self.calls = 0
        self.replaced = 0.0

    def output_set(self, ids):
        """For each id: its top_k candidate ids and their utilities in [0, 1] (cached)."""
        import torch

        missing = [i for i in ids.tolist() if i not in self.cache]
        if missing:
            index = torch.tensor(missing)
            similarity = self.unit[index] @ self.unit[self.candidates].T
            # the token itself is always in its own set
            top = similarity.topk(min(self.params.top_k, len(self.candidates)), dim=-1)
            for row, token in enumerate(missing):
                members, values = self.candidates[top.indices[row]], top.values[row]
                if token not in members.tolist():
                    members, values = torch.cat([members[:-1], index[row : row + 1]]), torch.cat([values[:-1], values.new_ones(1)])
                spread = (values.max() - values.min()).clamp_min(1e-12)
                self.cache[token] = (members, (values - values.min()) / spread)
        return [self.cache[i] for i in ids.tolist()]

    def protect_tokens(self, batch, step, phase):
        import torch

        from atoll.seeding import torch_generator

        self.calls += 1
        generator = torch_generator(self.context.seed, self.name, self.context.party, phase, step, self.calls)

        def choose(ids):
            sets = self.output_set(ids)
            width = max(len(m) for m, _ in sets)
            members = torch.stack([torch.nn.functional.pad(m, (0, width - len(m)), value=int(m[0])) for m, _ in sets])
            utility = torch.stack([torch.nn.functional.pad(u, (0, width - len(u)), value=float("-inf")) for _, u in sets])
            out = members.gather(1, sample_rows(0.5 * self.params.epsilon * utility, generator).unsqueeze(-1)).squeeze(-1)
            self.replaced = float((out != ids).float().mean())
            return out

        return replace_tokens(batch, choose, self.special)

    def report(self) -> dict[str, float]:
        return {"replaced_share": self.replaced}
