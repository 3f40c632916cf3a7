"""CusText: every word has a customised small output set, and a word is replaced by a member of its
set drawn by the exponential mechanism with its similarity as utility: P(y | x) ∝ exp(ε·u(x, y)/2),
u the cosine similarity of the word embeddings min-max normalised to [0, 1] within the set (Chen,
Li, Zhang, Lu, Yu and others, "A Customized Text Sanitization Mechanism with Differential Privacy",
Findings of ACL 2023; VFLAIR-LLM's CusText).

The output sets follow the paper's mapping (its "conservative" strategy): the corpus words are
taken most frequent first; a word not yet mapped and the ``top_k`` − 1 unmapped words most similar
to it form one set, and every member maps to that set (so the sets are disjoint, each of size
``top_k`` but for the last of a group, and any two words of a set share the same output set: the
ε guarantee holds between them). A word not in the corpus vocabulary uses the set of its most
similar corpus word (the authors' code sends it unchanged). Words, the corpus vocabulary, word
embeddings and the one deviation (sets are built within a form: the same number of sub-tokens,
leading space and kind of characters) are in ``words.py``. Applied in training, evaluation and
generation.
"""

from __future__ import annotations

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams
from atoll.split.defenses.words import CorpusWords, by_form, sample_rows


class CusTextParams(DefenseParams):
    epsilon: float = Field(3.0, gt=0, description="privacy parameter (smaller: the draw within the output set is closer to uniform)")
    top_k: int = Field(20, gt=1, description="K: size of each word's customised output set")


class CusText(Defense):
    name = "custext"
    paper = "Chen et al., A Customized Text Sanitization Mechanism with Differential Privacy, Findings of ACL 2023"
    summary = "replace each word by a member of its customised output set of top_k similar words, by the exponential mechanism"
    Params = CusTextParams

    def __init__(self, params: CusTextParams, context):
        super().__init__(params, context)
        import torch
        from torch.nn import functional as F

        self.vocabulary = CorpusWords(context)
        self.unit = F.normalize(self.vocabulary.embeddings, dim=-1)
        self.set_of = torch.full((len(self.vocabulary.words),), -1, dtype=torch.long)
        self.sets: list = []
        for members in self.vocabulary.groups.values():  # members: most frequent first
            free = torch.ones(len(members), dtype=torch.bool)
            for position in range(len(members)):
                if not free[position]:
                    continue
                similarity = self.unit[members] @ self.unit[members[position]]
                similarity[~free] = float("-inf")
                similarity[position] = float("inf")  # the word itself is always in its set
                take = similarity.topk(min(params.top_k, int(free.sum()))).indices
                free[take] = False
                self.set_of[members[take]] = len(self.sets)
                self.sets.append(members[take])
        self.calls = 0
        self.replaced = 0.0

    def output_set(self, word: tuple[int, ...]):
        """The corpus word indices ``word`` may become (None: no corpus word of its form)."""
        vocabulary = self.vocabulary
        index = vocabulary.index.get(word)
        if index is None:
            candidates = vocabulary.candidates(word)
            if candidates is None:
                return None
            unit = self.unit_of(word)
            index = int(candidates[(self.unit[candidates] @ unit).argmax()])
        return self.sets[int(self.set_of[index])]

    def unit_of(self, word: tuple[int, ...]):
        from torch.nn import functional as F

        index = self.vocabulary.index.get(word)
        return self.unit[index] if index is not None else F.normalize(self.vocabulary.embed(word), dim=-1)

    def utilities(self, word: tuple[int, ...], members):
        similarity = self.unit[members] @ self.unit_of(word)
        spread = (similarity.max() - similarity.min()).clamp_min(1e-12)
        return (similarity - similarity.min()) / spread

    def choose(self, words, generator):
        import torch

        vocabulary = self.vocabulary
        out = list(words)
        for form, positions in by_form(words, vocabulary).items():
            if form is None:
                for i in positions:
                    out[i] = vocabulary.fallback(words[i])
                continue
            sets = [self.output_set(words[i]) for i in positions]
            width = max(len(m) for m in sets)
            members = torch.stack([torch.nn.functional.pad(m, (0, width - len(m)), value=int(m[0])) for m in sets])
            utility = torch.stack(
                [
                    torch.nn.functional.pad(self.utilities(words[i], m), (0, width - len(m)), value=float("-inf"))
                    for i, m in zip(positions, sets)
                ]
            )
            picked = members.gather(1, sample_rows(0.5 * self.params.epsilon * utility, generator).unsqueeze(-1)).squeeze(-1)
            for i, j in zip(positions, picked.tolist()):
                out[i] = vocabulary.words[j]
        return out

    def protect_tokens(self, batch, step, phase):
        from atoll.seeding import torch_generator

        self.calls += 1
        generator = torch_generator(self.context.seed, self.name, self.context.party, phase, step, self.calls)
        batch, self.replaced = self.vocabulary.sanitize(batch, lambda words: self.choose(words, generator))
        return batch

    def report(self) -> dict[str, float]:
        return {"replaced_share": self.replaced}
