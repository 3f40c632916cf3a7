"""What the text-level defenses (SanText, CusText, RanText) share: words, the data party's corpus
vocabulary of words, word embeddings, and the replacement of whole words in a batch.

The papers sanitise words; the model reads sub-word tokens. Here a **word** is a run of tokens the
tokenizer's pre-tokenisation keeps together, read back from the token ids, and special tokens
always split words:

- WordPiece: a word starts at every token without the ``##`` continuation prefix.
- Byte-level BPE (GPT-2 style, atoll's own models): at a token with the leading-space marker
  ``Ġ`` and where the kind of character changes (letter, digit, other: the pre-tokeniser's regex
  splits there); a lone space token joins the word after it.
- SentencePiece style (a ``Metaspace`` pre-tokeniser, or the normaliser that prepends ``▁`` and
  replaces spaces by it, as Llama's tokenizers have; BPE or Unigram, with or without byte
  fallback): a word starts only at a token that begins with the ``▁`` marker, and a token made of
  markers only (``▁``, ``▁▁``: extra spaces) joins the word after it. A kind change is no
  boundary here (the pieces of ``▁word,`` are chosen together), so ``▁word,`` is one word.
  Byte-fallback tokens (``<0xE4>``) are ordinary tokens of their word.

Whitespace-only runs are not words and are never replaced.

- The **corpus vocabulary** is the set of words of the data party's own training texts, with their
  counts; a sanitiser emits only these words.
- A word's **embedding** is the mean of the model's input-embedding rows of its sub-tokens (the
  head's table, public: the pretrained model's).
- A word is replaced only by a word of the same **form**: the same number of sub-tokens, the same
  leading-space form, the same kind of first and last character. So a sanitised batch keeps its
  shape, every position stays aligned with the labels and attention mask the training and attack
  code rely on, and the replacement's token ids are exactly what re-tokenising the sanitised text
  gives (the pre-tokeniser splits the text at the same places, and each piece is tokenised on its
  own; a test checks this on real texts). This restriction is the one deviation from the papers,
  which draw from the whole vocabulary. A word with no corpus word of its form becomes as many
  ``unk`` tokens (it is never sent as it was). With a SentencePiece-style tokenizer the leading
  form is the number of ``▁`` markers the word opens with (1 for a word after one space, 2 after
  two, 0 for a text's first word where the tokenizer prepends nothing; a decoded text drops the
  first word's first space and re-encoding puts one back, so a word of two markers must never
  stand first), and a corpus word is a candidate only if the tokenizer gives its ids back from
  its own text, read where it can stand (a word cut by truncation, one whose byte-fallback bytes
  end inside a character, or one without a marker where the tokenizer always prepends one, is
  left out: its text would not re-tokenise to it).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from atoll.split.defenses.base import DefenseContext

LETTER, DIGIT, OTHER, SPACE, UNKNOWN = range(5)
SPACE_MARKERS = ("Ġ", "▁")


def char_kind(ch: str) -> int:
    if ch == "\ufffd":  # a byte of a character split across tokens
        return UNKNOWN
    if ch.isspace():
        return SPACE
    if ch.isalpha():
        return LETTER
    if ch.isdigit() or ch.isnumeric():
        return DIGIT
    return OTHER


class TokenFacts:
    """Per-token facts of a tokenizer, computed once for the embedding table's rows: whether the
    token opens a word with a space, the kind of its first and last character, and whether it is
    a WordPiece continuation."""

    def __init__(self, tokenizer, size: int, special_ids: set[int]):
        import numpy as np

        if tokenizer is None:
            from atoll.errors import ConfigError

            raise ConfigError("the text-level defenses need the data party's tokenizer", "run them through atoll split run")
        count = min(size, len(tokenizer))
        strings = tokenizer.convert_ids_to_tokens(list(range(count)))
        texts = tokenizer.batch_decode([[i] for i in range(count)], clean_up_tokenization_spaces=False)
        model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
        self.wordpiece = type(model).__name__ == "WordPiece" or hasattr(tokenizer, "wordpiece_tokenizer")
        prefix = getattr(model, "continuing_subword_prefix", None) or "##"
        # SentencePiece style: the word-start marker ("▁"), or None
        self.marker = None if self.wordpiece else sentencepiece_marker(tokenizer)
        self.size = size
        self.lead = np.zeros(size, dtype=bool)  # starts with a space (SentencePiece: with the marker)
        self.lone_space = np.zeros(size, dtype=bool)  # exactly one space
        self.continuation = np.zeros(size, dtype=bool)  # WordPiece "##"
        self.markers = np.zeros(size, dtype=np.int16)  # SentencePiece: how many markers it opens with
        self.blank = np.zeros(size, dtype=bool)  # SentencePiece: markers only ("▁", "▁▁")
        self.first = np.full(size, OTHER, dtype=np.int8)
        self.last = np.full(size, OTHER, dtype=np.int8)
        for i, (string, text) in enumerate(zip(strings, texts)):
            string = string or ""
            if self.wordpiece:
                self.continuation[i] = string.startswith(prefix)
                text = string[len(prefix) :] if self.continuation[i] else string
            elif self.marker is not None:
                body = string.lstrip(self.marker)
                self.markers[i] = len(string) - len(body)
                self.blank[i] = bool(string) and not body
                # the decoder drops a text's first space: put the token's own spaces back
                text = " " * int(self.markers[i]) + text.lstrip(" ") if self.markers[i] else text
                self.lead[i] = self.markers[i] > 0
            elif string.startswith(SPACE_MARKERS):
                text = " " + string[1:] if not text[:1].isspace() else text
            if self.marker is None:
                self.lead[i] = text[:1].isspace()
            self.lone_space[i] = text == " "
            core = text.strip()
            self.first[i] = char_kind(core[0]) if core else SPACE
            self.last[i] = char_kind(core[-1]) if core else SPACE
        self.special = np.zeros(size, dtype=bool)
        self.special[[i for i in special_ids if 0 <= i < size]] = True
        self.unk = getattr(tokenizer, "unk_token_id", None)

    def starts(self, ids) -> "object":
        """For a 1-D int array of consecutive non-special tokens: where a word starts."""
        import numpy as np

        start = np.ones(len(ids), dtype=bool)
        if len(ids) < 2:
            return start
        previous, current = ids[:-1], ids[1:]
        if self.wordpiece:
            start[1:] = ~self.continuation[current]
            return start
        if self.marker is not None:  # at the marker; markers-only tokens join the word after them
            start[1:] = self.lead[current] & ~self.blank[previous]
            return start
        before, after = self.last[previous], self.first[current]
        kinds_differ = (before != after) & (before != UNKNOWN) & (after != UNKNOWN)
        joins_space = self.lone_space[previous] & ~self.lead[current] & (after != SPACE)
        start[1:] = (self.lead[current] | kinds_differ) & ~joins_space
        return start

    def spans(self, ids, keep=None) -> list[tuple[int, int]]:
        """(start, end) of every word of a 1-D token array (special tokens and positions where
        ``keep`` is False split words and are never part of one; whitespace-only runs are left
        out)."""
        import numpy as np

        ids = np.asarray(ids, dtype=np.int64) % self.size
        spans: list[tuple[int, int]] = []
        ordinary = ~self.special[ids]
        if keep is not None:
            ordinary &= np.asarray(keep, dtype=bool)
        position = 0
        while position < len(ids):
            if not ordinary[position]:
                position += 1
                continue
            end = position
            while end < len(ids) and ordinary[end]:
                end += 1
            run = ids[position:end]
            cuts = np.flatnonzero(self.starts(run)).tolist() + [len(run)]
            for a, b in zip(cuts[:-1], cuts[1:]):
                if (self.first[run[a:b]] != SPACE).any():
                    spans.append((position + a, position + b))
            position = end
        return spans

    def form(self, word: tuple[int, ...]) -> tuple[int, bool | int, int, int]:
        """(sub-tokens, leading space, kind of the first character, kind of the last); with a
        SentencePiece-style tokenizer the leading space is the number of markers the word opens
        with (0, 1, 2, ...)."""
        inner = [t for t in word if self.first[t] != SPACE] or list(word)
        return len(word), self.leading(word), int(self.first[inner[0]]), int(self.last[inner[-1]])

    def leading(self, word: tuple[int, ...]) -> bool | int:
        if self.marker is None:
            return bool(self.lead[word[0]])
        count = 0
        for t in word:
            count += int(self.markers[t])
            if not self.blank[t]:
                break
        return count


class CorpusWords:
    """The data party's corpus vocabulary of words: each word's token ids, count, form and
    embedding (the mean of its sub-tokens' input embeddings), grouped by form."""

    def __init__(self, context: DefenseContext):
        import torch

        self.table = context.word_embeddings.float()
        special = set(getattr(context.tokenizer, "all_special_ids", None) or [])
        self.facts = TokenFacts(context.tokenizer, self.table.shape[0], special)
        counts: Counter = Counter()
        for sequence in corpus_sequences(context):
            for a, b in self.facts.spans(sequence):
                counts[tuple(int(t) for t in sequence[a:b])] += 1
        if self.facts.marker is not None:
            for word in unfaithful_words(context.tokenizer, self.facts, list(counts), special):
                del counts[word]
        self.words: list[tuple[int, ...]] = sorted(counts, key=lambda w: (-counts[w], w))  # most frequent first
        self.index = {word: i for i, word in enumerate(self.words)}
        self.counts = torch.tensor([counts[w] for w in self.words], dtype=torch.long)
        self.embeddings = torch.stack([self.embed(w) for w in self.words]) if self.words else self.table.new_zeros(0, self.table.shape[1])
        groups: dict[tuple, list[int]] = {}
        for i, word in enumerate(self.words):
            groups.setdefault(self.facts.form(word), []).append(i)
        self.groups = {form: torch.tensor(members, dtype=torch.long) for form, members in groups.items()}

    def embed(self, word: tuple[int, ...]):
        return self.table[list(word)].mean(0)

    def embedding_of(self, word: tuple[int, ...]):
        i = self.index.get(word)
        return self.embeddings[i] if i is not None else self.embed(word)

    def candidates(self, word: tuple[int, ...]):
        """Indices of the corpus words ``word`` may become (its form's group), or None."""
        return self.groups.get(self.facts.form(word))

    def fallback(self, word: tuple[int, ...]) -> tuple[int, ...]:
        """What a word with no corpus word of its form becomes: as many ``unk`` tokens (the word
        itself if the tokenizer has none)."""
        return (self.facts.unk,) * len(word) if self.facts.unk is not None else word

    def sanitize(self, batch: dict, choose: Callable[[list[tuple[int, ...]]], list[tuple[int, ...]]]) -> tuple[dict, float]:
        """A copy of ``batch`` whose words (at real positions) are replaced by ``choose(words)``
        (one replacement of the same length per occurrence, in order), and the share of words
        that changed."""
        import torch

        ids = batch["input_ids"]
        mask = batch["attention_mask"].bool()
        found: list[tuple[int, int, int]] = []  # (row, start, end)
        words: list[tuple[int, ...]] = []
        rows = ids.tolist()
        for row, (tokens, keep) in enumerate(zip(rows, mask.tolist())):
            for a, b in self.facts.spans(tokens, keep):
                found.append((row, a, b))
                words.append(tuple(tokens[a:b]))
        if not words:
            return batch, 0.0
        replacements = choose(words)
        new_ids = ids.clone()
        changed = 0
        for (row, a, b), word, new in zip(found, words, replacements):
            if len(new) != b - a:
                raise AssertionError("a word's replacement must keep its number of sub-tokens")
            if new != word:
                changed += 1
                new_ids[row, a:b] = torch.tensor(new, dtype=ids.dtype)
        return {**batch, "input_ids": new_ids}, changed / len(words)


def sentencepiece_marker(tokenizer) -> str | None:
    """The word-start marker of a SentencePiece-style tokenizer (``▁``), read from its
    pre-tokeniser (``Metaspace``) or normaliser (``Prepend``, or ``Replace`` of the space), or None
    (WordPiece, byte-level BPE, a tokenizer without a ``tokenizers`` backend)."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind == "Metaspace" and node.get("replacement"):
                found.append(node["replacement"])
            elif kind == "Prepend" and node.get("prepend", "").strip():
                found.append(node["prepend"])
            elif kind == "Replace" and node.get("pattern") == {"String": " "} and node.get("content", "").strip():
                found.append(node["content"])
            for value in node.values():
                walk(value)

    for part in ("pre_tokenizer", "normalizer"):
        component = getattr(backend, part, None)
        if component is None:
            continue
        try:
            walk(json.loads(component.__getstate__()))
        except (TypeError, ValueError, AttributeError):
            continue
    return found[0][0] if found else None


def unfaithful_words(tokenizer, facts: TokenFacts, words: list[tuple[int, ...]], special: set[int]) -> list[tuple[int, ...]]:
    """The corpus words whose text the tokenizer does not turn back into them (a word cut by
    truncation, bytes that end inside a character, a piece with no marker where the tokenizer
    would put one); SentencePiece style only. A word that opens with a marker is read after an
    anchor word, the tokenizer's own ids for "a" (without one, such words are not checked); a
    word without one is read as a whole text, the only place it can stand."""
    if not words:
        return []

    def encoded(ids_list: list[list[int]]) -> list[list[int]]:
        if not ids_list:
            return []
        texts = tokenizer.batch_decode(ids_list, clean_up_tokenization_spaces=False)
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    anchor = [t for t in tokenizer("a", add_special_tokens=False)["input_ids"] if t not in special]
    anchored = bool(anchor) and encoded([anchor])[0] == anchor
    bare = [w for w in words if not facts.leading(w)]
    marked = [w for w in words if facts.leading(w)] if anchored else []
    unfaithful = [w for w, ids in zip(bare, encoded([list(w) for w in bare])) if ids != list(w)]
    unfaithful += [w for w, ids in zip(marked, encoded([anchor + list(w) for w in marked])) if ids != anchor + list(w)]
    return unfaithful


def corpus_sequences(context: DefenseContext) -> list:
    """The token ids of the data party's own training examples."""
    if context.corpus is None:
        from atoll.errors import ConfigError

        raise ConfigError("the text-level defenses need the data party's training texts", "run them through atoll split run")
    return context.corpus()


def by_form(words: list[tuple[int, ...]], vocabulary: CorpusWords) -> dict:
    """Occurrence positions grouped by the candidate group of their form: {form: [positions]}
    (form None: no corpus word of that form)."""
    groups: dict = {}
    for position, word in enumerate(words):
        form = vocabulary.facts.form(word)
        groups.setdefault(form if form in vocabulary.groups else None, []).append(position)
    return groups


def sample_rows(logits, generator):
    """One index per row of ``logits`` (unnormalised log-probabilities), from ``generator``."""
    import torch

    probabilities = torch.softmax(logits.double(), dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)
