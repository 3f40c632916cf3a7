"""SanText+: word-level local DP before the head. A word x is replaced by a word y of the data
party's corpus vocabulary drawn with probability ∝ exp(−½·ε·‖e_x − e_y‖) (the exponential mechanism
with the Euclidean distance of word embeddings as utility: ε·d_χ-privacy for every pair of words
at distance d). Sensitive words, the ``sensitive`` share of the corpus vocabulary that is rarest in
the data party's text, and every word not in it, are always sanitised; the others with
probability ``p`` and otherwise kept (Yue, Du, Wang, Li, Sun and Chow, "Differential Privacy for
Text Analytics via Natural Text Sanitization", Findings of ACL 2021; VFLAIR-LLM's SanText).

Words, the corpus vocabulary, word embeddings (the mean of the sub-tokens' input embeddings) and
the one deviation (y is drawn among the corpus words of x's form: the same number of sub-tokens,
the same leading space and kind of characters, so the sequence keeps its length) are in
``words.py``. The authors' code draws the replacement from the sensitive words only; here, as in
the paper's definition, from the whole corpus vocabulary (of that form). Applied in training,
evaluation and generation.
"""

from __future__ import annotations

from pydantic import Field

from atoll.split.defenses.base import Defense, DefenseParams
from atoll.split.defenses.words import CorpusWords, by_form, sample_rows


class SanTextParams(DefenseParams):
    epsilon: float = Field(3.0, gt=0, description="privacy parameter of the exponential mechanism (smaller: more random replacements)")
    sensitive: float = Field(0.5, ge=0, le=1, description="share of the corpus vocabulary treated as sensitive (the rarest words)")
    p: float = Field(0.3, ge=0, le=1, description="probability of sanitising a non-sensitive word")


class SanText(Defense):
    name = "santext"
    paper = "Yue et al., Differential Privacy for Text Analytics via Natural Text Sanitization (SanText+), Findings of ACL 2021"
    summary = "replace words by the exponential mechanism over word-embedding distance (rare words always, others with probability p)"
    Params = SanTextParams

    def __init__(self, params: SanTextParams, context):
        super().__init__(params, context)
        import torch

        self.vocabulary = CorpusWords(context)
        count = len(self.vocabulary.words)
        # words are ordered most frequent first: the last `sensitive` share are the rarest
        self.sensitive = torch.zeros(count, dtype=torch.bool)
        self.sensitive[count - int(round(params.sensitive * count)) :] = True
        self.calls = 0
        self.replaced = 0.0

    def is_sensitive(self, word: tuple[int, ...]) -> bool:
        index = self.vocabulary.index.get(word)
        return index is None or bool(self.sensitive[index])

    def choose(self, words, generator):
        import torch

        vocabulary = self.vocabulary
        out = list(words)
        draws = torch.rand(len(words), generator=generator).tolist()
        for form, positions in by_form(words, vocabulary).items():
            change = [i for i in positions if self.is_sensitive(words[i]) or draws[i] < self.params.p]
            if not change:
                continue
            if form is None:
                for i in change:
                    out[i] = vocabulary.fallback(words[i])
                continue
            candidates = vocabulary.groups[form]
            points = torch.stack([vocabulary.embedding_of(words[i]) for i in change])
            distances = torch.cdist(points, vocabulary.embeddings[candidates])
            # every occurrence draws on its own
            picked = candidates[sample_rows(-0.5 * self.params.epsilon * distances, generator)]
            for i, j in zip(change, picked.tolist()):
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
