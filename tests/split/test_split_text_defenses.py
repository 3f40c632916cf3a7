"""The word-level text sanitisers (SanText+, CusText, RanText): they emit only words of the data
party's own corpus, re-tokenising their output gives the ids they send, their ε moves how many
words change in the documented direction, one word's replacement follows the mechanism's formula
on a constructed vocabulary (a chi-square check), CusText's output sets have K members, and on
atoll's pretrained atoll-edge a smaller ε lowers the white-box inversion's token recall. On
SentencePiece-style tokenizers (the "▁" marker of Llama's and Gemma's, trained here in memory):
words are the text's words, and what each sanitiser sends re-tokenises to the ids sent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atoll.split.defenses.base import DefenseContext
from atoll.split.defenses.custext import CusText, CusTextParams
from atoll.split.defenses.rantext import RanText, RanTextParams
from atoll.split.defenses.santext import SanText, SanTextParams
from atoll.split.runner import connect, corpus_reader, run_attacks

from .helpers import ATOLL_EDGE, reconfigured

DEFENSES = {"santext": (SanText, SanTextParams), "custext": (CusText, CusTextParams), "rantext": (RanText, RanTextParams)}


def build(name: str, context: DefenseContext, **params):
    cls, params_cls = DEFENSES[name]
    return cls(params_cls(**params), context)


def context_of(setup) -> DefenseContext:
    table = setup.model.get_input_embeddings().weight.detach().clone()
    return DefenseContext(
        0, 0, "head-tail", setup.head, table.shape[1], setup.num_labels, table, setup.tokenizer, None, corpus_reader(setup, 0)
    )


# -- a constructed vocabulary: WordPiece, 2-d embeddings chosen by hand ---------------------------
TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c", "d", "e", "f", "##x", "##y", ","]
ANGLES = {"a": 0, "b": 10, "c": 30, "d": 90, "e": 100, "f": 180}  # degrees
LENGTHS = {"a": 1.0, "b": 1.5, "c": 0.8, "d": 2.0, "e": 1.2, "f": 1.0}
# the corpus: word -> count (a most frequent); "ax" = a + ##x, a word of two sub-tokens
CORPUS = {"a": 9, "b": 8, "c": 7, "d": 6, "e": 5, "f": 4, "ax": 3, "by": 2, "cx": 2, ",": 2}


@pytest.fixture(scope="module")
def tiny():
    """(tokenizer, embedding table, corpus sequences, id of each token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {t: i for i, t in enumerate(TOKENS)}
    backend = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    table = torch.zeros(len(TOKENS), 2)
    for word, angle in ANGLES.items():
        table[ids[word]] = LENGTHS[word] * torch.tensor([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
    table[ids["##x"]] = torch.tensor([0.5, 0.5])
    table[ids["##y"]] = torch.tensor([-1.0, 0.0])
    table[ids[","]] = torch.tensor([5.0, 5.0])
    text = " ".join(w for w, n in CORPUS.items() for _ in range(n))
    corpus = [np.array(tokenizer(text)["input_ids"])]
    return tokenizer, table, corpus, ids


def tiny_context(tiny) -> DefenseContext:
    tokenizer, table, corpus, _ = tiny
    return DefenseContext(0, 0, "head-tail", "classification", 2, 2, table, tokenizer, None, lambda: corpus)


def draws(defense, tokenizer, word: str, count: int) -> list[str]:
    """``count`` sanitisations of ``word`` (each occurrence draws on its own): the words sent."""
    ids = tokenizer(" ".join([word] * count))["input_ids"]
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    out = defense.protect_tokens(batch, 1, "train")["input_ids"][0].tolist()
    return tokenizer.decode(out, skip_special_tokens=True).split()


def assert_matches(observed: list[str], expected: dict[str, float]) -> None:
    """Pearson's chi-square test of the observed words against the expected probabilities: fails
    when the statistic exceeds its 0.1 % critical value (Wilson-Hilferty approximation)."""
    assert set(observed) <= set(expected), set(observed) - set(expected)
    n = len(observed)
    statistic = sum((observed.count(w) - n * p) ** 2 / (n * p) for w, p in expected.items())
    df = len(expected) - 1
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    assert statistic < critical, (statistic, critical, {w: observed.count(w) / n for w in expected}, expected)


def embedding(tiny, word: str) -> torch.Tensor:
    tokenizer, table, _, ids = tiny
    return table[tokenizer(word, add_special_tokens=False)["input_ids"]].mean(0)


def softmax(values: dict[str, float]) -> dict[str, float]:
    top = max(values.values())
    weights = {w: math.exp(v - top) for w, v in values.items()}
    total = sum(weights.values())
    return {w: x / total for w, x in weights.items()}


def test_santext_draws_by_the_exponential_mechanism_over_word_distances(tiny):
    """SanText+: P(y | x) ∝ exp(−ε·‖e_x − e_y‖/2) over the corpus words of x's form, e the mean of
    the sub-tokens' embeddings: for a one-token word, a two-token word, and one not in the corpus."""
    tokenizer = tiny[0]
    epsilon = 2.0
    santext = build("santext", tiny_context(tiny), epsilon=epsilon, sensitive=1.0)
    for word, group in (("a", "abcdef"), ("ax", ["ax", "by", "cx"]), ("dy", ["ax", "by", "cx"])):
        expected = softmax({y: -0.5 * epsilon * float((embedding(tiny, word) - embedding(tiny, y)).norm()) for y in group})
        assert_matches(draws(santext, tokenizer, word, 3000), expected)


def test_santext_keeps_non_sensitive_words_with_probability_one_minus_p(tiny):
    """SanText+: the rarest share of the vocabulary is always sanitised, the others with probability
    p: at a tiny ε a sanitised word is uniform over its 6 candidates."""
    tokenizer = tiny[0]
    santext = build("santext", tiny_context(tiny), epsilon=1e-6, sensitive=0.0, p=0.3)
    observed = draws(santext, tokenizer, "a", 3000)
    assert_matches(observed, {y: (0.7 if y == "a" else 0.0) + 0.3 / 6 for y in "abcdef"})


def test_custext_output_sets_have_k_members_and_draws_follow_the_mechanism(tiny):
    """CusText: the most frequent word and its K − 1 most similar unmapped words form one output set,
    shared by every member; P(y | x) ∝ exp(ε·u/2), u the cosine similarity min-max normalised in
    the set."""
    tokenizer, _, _, _ = tiny
    epsilon = 3.0
    custext = build("custext", tiny_context(tiny), epsilon=epsilon, top_k=3)
    words = custext.vocabulary.words
    sets = [sorted(tokenizer.decode(list(words[j])).replace(" ", "") for j in members.tolist()) for members in custext.sets]
    assert sorted(sets) == [[","], ["a", "b", "c"], ["ax", "by", "cx"], ["d", "e", "f"]]
    assert all(len(s) == 3 for s in sets if s != [","])
    similarity = {y: math.cos(math.radians(ANGLES[y] - ANGLES["b"])) for y in "abc"}
    low, high = min(similarity.values()), max(similarity.values())
    expected = softmax({y: 0.5 * epsilon * (s - low) / (high - low) for y, s in similarity.items()})
    assert_matches(draws(custext, tokenizer, "b", 3000), expected)


def test_rantext_draws_from_a_random_adjacency_list(tiny):
    """RanText: the radius r is the norm of a Laplace(Δf/ε) noise vector; the list holds the words
    within r (and the nearest, x itself); P(y | x, r) ∝ exp(ε·(1 − d/r)/2) there. The expected
    distribution is the average over 200,000 radii drawn here with numpy."""
    tokenizer = tiny[0]
    epsilon = 3.0
    rantext = build("rantext", tiny_context(tiny), epsilon=epsilon)
    words = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in CORPUS]
    values = torch.stack([tiny[1][w].mean(0) for w in words])
    spread = float(values.max() - values.min())
    distance = {y: float((embedding(tiny, "b") - embedding(tiny, y)).norm()) for y in "abcdef"}
    rng = np.random.default_rng(1)
    radii = np.linalg.norm(rng.laplace(0, spread / epsilon, size=(200_000, 2)), axis=1)
    d = np.array([distance[y] for y in "abcdef"])
    inside = (d[None] <= radii[:, None]) | (d[None] == d.min())
    weights = np.where(inside, np.exp(0.5 * epsilon * (1 - d[None] / radii[:, None])), 0.0)
    expected = dict(zip("abcdef", (weights / weights.sum(1, keepdims=True)).mean(0), strict=True))
    assert_matches(draws(rantext, tokenizer, "b", 3000), expected)


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_a_word_of_a_form_the_corpus_lacks_becomes_unk_tokens(tiny, name):
    """ "axy" (three sub-tokens: no corpus word has three) is sent as three unk tokens, never as it
    was; the other words of the line become corpus words of their own form."""
    tokenizer = tiny[0]
    defense = build(name, tiny_context(tiny), epsilon=1.0)
    ids = tokenizer("axy b cx ,")["input_ids"]
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    sent = tokenizer.convert_ids_to_tokens(defense.protect_tokens(batch, 1, "eval")["input_ids"][0].tolist())
    assert sent[:3] == ["[UNK]"] * 3
    assert sent[3] in set("abcdef")
    assert sent[4] in {"a", "b", "c"} and sent[5] in {"##x", "##y"}
    assert sent[6] == ","


def test_words_of_a_byte_level_bpe_whose_vocabulary_has_a_hash_pair(tmp_path):
    """A byte-level BPE with a "##" token (as GPT-2's has) is not mistaken for WordPiece: words start
    at the space marker and where the kind of character changes."""
    from atoll.models.registry import train_bpe_tokenizer
    from atoll.split.defenses.words import TokenFacts

    tokenizer = train_bpe_tokenizer(["## title ##", "hello ## world", "hello, world"] * 20, 300, tmp_path)
    assert "##" in tokenizer.get_vocab()
    facts = TokenFacts(tokenizer, len(tokenizer), set(tokenizer.all_special_ids))
    assert not facts.wordpiece
    ids = tokenizer("hello ## world, hello")["input_ids"]
    assert [tokenizer.decode(ids[a:b]) for a, b in facts.spans(ids)] == ["hello", " ##", " world", ",", " hello"]


# -- atoll-edge's tokenizer and embeddings, Shakespeare lines --------------------------------------
# (defense, large ε, small ε, fixed parameters)
SETTINGS = [("santext", 1000.0, 0.1, {"sensitive": 1.0}), ("custext", 1000.0, 0.1, {}), ("rantext", 1000.0, 1.0, {})]


@pytest.mark.parametrize("name,large,small,fixed", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_sanitised_text_is_corpus_words_and_epsilon_sets_how_many_change(atoll_edge_setup, name, large, small, fixed):
    """On 16 training lines: every word sent is a word of the data party's corpus; re-tokenising the
    sanitised text gives exactly the ids sent (same length, same alignment); at a large ε almost
    every word is kept, at a small ε most are replaced."""
    setup = atoll_edge_setup
    context = context_of(setup)
    batch = next(iter(setup.data.eval_batches(setup.party_indices[0][:16], 16)))
    special = set(setup.tokenizer.all_special_ids)
    share = {}
    for epsilon in (large, small):
        defense = build(name, context, epsilon=epsilon, **fixed)
        sent = defense.protect_tokens(batch, 1, "train")
        share[epsilon] = defense.report()["replaced_share"]
        vocabulary = defense.vocabulary
        for ids, keep in zip(sent["input_ids"].tolist(), sent["attention_mask"].tolist(), strict=True):
            for a, b in vocabulary.facts.spans(ids, keep):
                assert tuple(ids[a:b]) in vocabulary.index
            real = [t for t, k in zip(ids, keep, strict=True) if k and t not in special]
            text = setup.tokenizer.decode(real)
            assert setup.tokenizer(text, add_special_tokens=False)["input_ids"] == real
    assert share[large] <= 0.05
    assert share[small] >= 0.6


def test_custext_output_sets_on_a_real_corpus_have_k_members(atoll_edge_setup):
    """Every output set has K words but, per form, the last one built (fewer words were left)."""
    custext = build("custext", context_of(atoll_edge_setup), top_k=5)
    sizes = [len(members) for members in custext.sets]
    assert sum(sizes) == len(custext.vocabulary.words)
    assert sum(size < 5 for size in sizes) <= len(custext.vocabulary.groups)
    assert max(sizes) == 5 and sizes.count(5) >= 0.8 * len(sizes)


INVERSION = "{name: white-box-inversion, steps: 60, lr: 0.1, batches: 1}"


def edge_inversion(setup, root, defense: str | None) -> float:
    """The white-box inversion's token recall on atoll-edge's first training batch (8 lines)."""
    overrides = {**ATOLL_EDGE, "attacks": f"[{INVERSION}]", "record.limit": 1, "train.batch_size": 8}
    if defense:
        overrides["defenses"] = f"[{defense}]"
    session = connect(reconfigured(setup, root, overrides), None)
    session.parties[0].train_step()
    return run_attacks(session)["white-box-inversion"]["token_recall"]


def test_a_smaller_epsilon_lowers_the_inversion_on_atoll_edge(atoll_edge_setup, tmp_path):
    """The trade-off's privacy side on atoll's pretrained LM: without a defense the white-box
    inversion (the public head known, 60 steps) reads about half the tokens of the lines (measured
    0.53); each sanitiser leaves it there at ε 1000 (0.53 for all three) and lowers it at a small ε
    (SanText ε 0.1: 0.067, CusText ε 0.1: 0.068, RanText ε 1: 0.056)."""
    baseline = edge_inversion(atoll_edge_setup, tmp_path, None)
    assert baseline >= 0.4
    for name, large, small, fixed in SETTINGS:
        extra = "".join(f", {k}: {v}" for k, v in fixed.items())
        weak = edge_inversion(atoll_edge_setup, tmp_path, f"{{name: {name}, epsilon: {large}{extra}}}")
        strong = edge_inversion(atoll_edge_setup, tmp_path, f"{{name: {name}, epsilon: {small}{extra}}}")
        assert weak >= baseline - 0.1, name
        assert strong <= 0.5 * weak, name


# -- SentencePiece-style tokenizers (the "▁" word-start marker, as Llama's) ------------------------
# Five tokenizers trained here in memory on SP_LINES (nothing downloaded): the `tokenizers`
# library's SentencePieceBPETokenizer (Metaspace, "▁" prepended to every text, split at every
# "▁", NFKC) and SentencePieceUnigramTokenizer (with byte fallback added); transformers'
# LlamaTokenizer (Metaspace prepended to the first section only, no split, BPE with byte fallback,
# a "▁▁" piece merged first as Llama's vocabulary has); Llama-2's tokenizer.json layout (no
# pre-tokeniser; the normaliser prepends "▁" and replaces spaces by it); and Gemma's (the
# normaliser replaces spaces, nothing is prepended: a text's first word has no "▁"). In the
# byte-fallback ones, every non-ASCII character is spelled as <0xNN> byte tokens.
SP_LINES = [
    "The cat sat on the mat, and the dog sat on the log.",
    "A cat and a dog met 12 birds in 2024; the birds flew away!",
    "She said: hello world, hello again.",
    "We walked 3 miles to the old mill by the river.",
    "The river ran fast after the rain, and the mill wheel turned.",
    "Is the café open? The naïve waiter said yes, the café is open.",
    "My friend's dog barks at 7 o'clock every morning.",
    "Numbers like 42 and 1999 appear in the text  twice.",
    "He read the letter twice, then burned it.",
    "They sang songs, told stories and laughed until midnight.",
    "The quick brown fox jumps over the lazy dog.",
    "Rain, rain, go away; come again another day.",
    "In Tokyo they wrote 東京 and 日本 and 中文 on the  board.",
    "A résumé, a café and a naïve fiancé  walked in.",
]
# lines the tokenizers were not trained on (new words, a double space inside, digits, bytes)
SP_UNSEEN = ["Hello again, cat!", "The fox  ran 7 miles to Tokyo; 東京 is far.", "Rainy days, naïve dogs."]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]
SP_BYTES = [f"<0x{b:02X}>" for b in range(256)]
SP_VARIANTS = ["sp-bpe", "sp-unigram-bytes", "llama", "llama2-normalizer", "gemma-normalizer"]
SP_KEEPS_DOUBLE_SPACES = {"sp-bpe", "llama", "llama2-normalizer", "gemma-normalizer"}  # the Unigram's normaliser folds them
SP_NOTHING_PREPENDED = {"gemma-normalizer"}


def ascii_only(piece: str) -> bool:
    return all(ord(ch) < 128 or ch == "▁" for ch in piece)


def sp_bpe_backend():
    from tokenizers import SentencePieceBPETokenizer

    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator(SP_LINES, vocab_size=400, min_frequency=2, special_tokens=SP_SPECIALS, show_progress=False)
    return trained._tokenizer


def llama_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The specials, the 256 byte tokens, the ASCII pieces of a BPE trained on SP_LINES and "▁▁";
    the merges that make those pieces, ("▁", "▁") first."""
    import json

    model = json.loads(sp_bpe_backend().to_str())["model"]
    vocab = {t: i for i, t in enumerate(SP_SPECIALS + SP_BYTES)}
    for piece in sorted(model["vocab"], key=model["vocab"].get):
        if ascii_only(piece):
            vocab.setdefault(piece, len(vocab))
    vocab.setdefault("▁▁", len(vocab))
    merges = [("▁", "▁")]
    for merge in model["merges"]:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        if a in vocab and b in vocab and a + b in vocab:
            merges.append((a, b))
    return vocab, merges


def build_sentencepiece_tokenizer(variant: str):
    import json

    from tokenizers import SentencePieceUnigramTokenizer, Tokenizer, decoders, models, normalizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    names = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    if variant == "sp-bpe":
        return PreTrainedTokenizerFast(tokenizer_object=sp_bpe_backend(), **names)
    if variant == "sp-unigram-bytes":
        trained = SentencePieceUnigramTokenizer()
        trained.train_from_iterator(SP_LINES, vocab_size=300, special_tokens=SP_SPECIALS, unk_token="<unk>", show_progress=False)
        spec = json.loads(trained._tokenizer.to_str())
        pieces = [p for p in spec["model"]["vocab"] if p[0] in SP_SPECIALS or ascii_only(p[0])]
        assert [p[0] for p in pieces[:3]] == SP_SPECIALS
        low = min(score for _, score in pieces if score < 0) - 1.0
        spec["model"].update(vocab=pieces[:3] + [[b, low] for b in SP_BYTES] + pieces[3:], unk_id=0, byte_fallback=True)
        spec["decoder"] = json.loads(
            decoders.Sequence(
                [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
            ).__getstate__()
        )
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **names)
    vocab, merges = llama_vocabulary()
    if variant == "llama":
        tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
        tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if variant == "llama2-normalizer":
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        assert variant == "gemma-normalizer"
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **names)


@pytest.fixture(scope="module", params=SP_VARIANTS)
def sentencepiece(request):
    """(variant, tokenizer, a random 8-d embedding table, the corpus: SP_LINES' ids with BOS)."""
    tokenizer = build_sentencepiece_tokenizer(request.param)
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(len(tokenizer), 8, generator=generator)
    corpus = [np.array(tokenizer(line)["input_ids"]) for line in SP_LINES]
    return request.param, tokenizer, table, corpus


def sp_context(sentencepiece, seed: int = 0, corpus=None) -> DefenseContext:
    _, tokenizer, table, lines = sentencepiece
    lines = lines if corpus is None else corpus
    return DefenseContext(0, seed, "head-tail", "classification", 8, 2, table, tokenizer, None, lambda: lines)


def test_the_sentencepiece_marker_is_read_from_the_tokenizer_pipeline(sentencepiece, tiny, tmp_path):
    """SentencePiece style is told from the pre-tokeniser or normaliser, never from the vocabulary:
    the SentencePiece-style tokenizers have it, the WordPiece and a byte-level BPE have none."""
    from atoll.models.registry import train_bpe_tokenizer
    from atoll.split.defenses.words import sentencepiece_marker

    assert sentencepiece_marker(sentencepiece[1]) == "▁"
    assert sentencepiece_marker(tiny[0]) is None
    assert sentencepiece_marker(train_bpe_tokenizer(["a ▁ b", "hello ▁world"] * 20, 300, tmp_path)) is None


def test_sentencepiece_words_are_the_words_of_the_text(sentencepiece):
    """A word is what lies between spaces, punctuation attached ("world," is one word: the pieces
    of "▁world," are chosen together, so a kind change is no boundary); the BOS token is no part
    of one; byte-fallback tokens stay inside their word; the leading form counts the markers (1,
    the prepended one, for the first word, 0 where nothing is prepended; 2 after a double
    space)."""
    from atoll.split.defenses.words import TokenFacts

    variant, tokenizer = sentencepiece[:2]
    facts = TokenFacts(tokenizer, len(tokenizer), set(tokenizer.all_special_ids))
    assert facts.marker == "▁"
    byte_tokens = 0
    for text in SP_LINES + SP_UNSEEN:
        ids = tokenizer(text)["input_ids"]
        pieces = tokenizer.convert_ids_to_tokens(ids)
        byte_tokens += sum(p.startswith("<0x") for p in pieces)
        spans = facts.spans(ids)
        assert [tokenizer.decode(ids[a:b]).strip() for a, b in spans] == text.split(), pieces
        first = 0 if variant in SP_NOTHING_PREPENDED else 1
        expected = [first] + [2 if "  " + w in text and variant in SP_KEEPS_DOUBLE_SPACES else 1 for w in text.split()[1:]]
        assert [facts.leading(tuple(ids[a:b])) for a, b in spans] == expected, pieces
    assert (byte_tokens > 0) == (variant != "sp-bpe")


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_sentencepiece_sanitisers_send_corpus_words_of_the_same_form_that_retokenise(sentencepiece, name):
    """At a small ε, on the corpus lines and unseen ones (3 seeds): every word sent is a corpus word
    (or unk tokens) of the original word's form, at the same positions; re-tokenising the
    sanitised text gives exactly the ids sent; most words change, and with byte fallback some
    byte-spelled words become other byte-spelled words."""
    variant, tokenizer = sentencepiece[:2]
    small = {"santext": {"epsilon": 0.1, "sensitive": 1.0}, "custext": {"epsilon": 0.1}, "rantext": {"epsilon": 1.0}}[name]
    encoded = tokenizer(SP_LINES + SP_UNSEEN, padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    special = set(tokenizer.all_special_ids)
    unk = tokenizer.unk_token_id
    byte_ids = {i for t, i in tokenizer.get_vocab().items() if t.startswith("<0x")}
    shares, byte_swaps = [], 0
    for seed in range(3):
        defense = build(name, sp_context(sentencepiece, seed), **small)
        vocabulary = defense.vocabulary
        sent = defense.protect_tokens(batch, 1, "train")["input_ids"]
        shares.append(defense.report()["replaced_share"])
        for before, after, keep in zip(batch["input_ids"].tolist(), sent.tolist(), batch["attention_mask"].tolist(), strict=True):
            spans = vocabulary.facts.spans(before, keep)
            if unk not in after:
                assert vocabulary.facts.spans(after, keep) == spans
            for a, b in spans:
                old, new = tuple(before[a:b]), tuple(after[a:b])
                assert new in vocabulary.index or set(new) == {unk}, tokenizer.convert_ids_to_tokens(new)
                if set(new) != {unk}:
                    assert vocabulary.facts.form(new) == vocabulary.facts.form(old)
                byte_swaps += new != old and bool(set(old) & byte_ids) and bool(set(new) & byte_ids)
            real = [t for t, k in zip(after, keep, strict=True) if k and t not in special]
            text = tokenizer.decode(real)
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == real, (text, tokenizer.convert_ids_to_tokens(real))
    assert min(shares) >= 0.5
    assert (byte_swaps > 0) == (variant != "sp-bpe")


def test_a_sentencepiece_corpus_leaves_out_words_that_would_not_retokenise(sentencepiece):
    """Training lines cut by truncation leave a last word that is not what the tokenizer gives for
    its text (with byte fallback: "▁caf" "<0xC3>", bytes ending inside "é"): such a word is no
    candidate (never sent), while the whole words are; every candidate, read as it stands (a word
    with a marker after another word, one without as a text's start), re-tokenises to itself."""
    from atoll.split.defenses.words import CorpusWords

    variant, tokenizer = sentencepiece[:2]
    special = set(tokenizer.all_special_ids)
    whole = [tokenizer(text)["input_ids"] for text in ("the naïve café", "the wheel turned")]
    vocabulary = CorpusWords(sp_context(sentencepiece, corpus=[np.array(ids) for ids in whole] + [np.array(ids[:-1]) for ids in whole]))
    assert {"the", "naïve", "café", "wheel", "turned"} <= {tokenizer.decode(list(w)).strip() for w in vocabulary.words}
    anchor = [t for t in tokenizer("a", add_special_tokens=False)["input_ids"] if t not in special]
    for word in vocabulary.words:
        ids = anchor + list(word) if vocabulary.facts.leading(word) else list(word)
        assert tokenizer(tokenizer.decode(ids), add_special_tokens=False)["input_ids"] == ids, tokenizer.convert_ids_to_tokens(ids)
    if variant != "sp-bpe":  # "café" is spelled with bytes (sp-bpe: one token): cut inside the "é"
        cut = tuple(whole[0][vocabulary.facts.spans(whole[0])[-1][0] : -1])
        assert cut in {tuple(whole[0][a:b]) for a, b in vocabulary.facts.spans(whole[0][:-1])}
        assert tokenizer.decode(list(cut)).strip() == "caf\ufffd"
        assert cut not in vocabulary.index


def test_every_candidate_of_a_first_word_retokenises_at_the_start_of_a_text(sentencepiece):
    """The decoded text drops its first space and re-encoding puts one back, so a word that opens
    with two markers (after a double space) must never stand first: for the first word of every
    line, each candidate of its form in its place gives back exactly the ids (checked for every
    candidate, not sampled)."""
    from atoll.split.defenses.words import CorpusWords

    tokenizer = sentencepiece[1]
    vocabulary = CorpusWords(sp_context(sentencepiece))
    special = set(tokenizer.all_special_ids)
    checked = 0
    for line in SP_LINES + SP_UNSEEN:
        ids = [t for t in tokenizer(line)["input_ids"] if t not in special]
        a, b = vocabulary.facts.spans(ids)[0]
        assert a == 0
        candidates = vocabulary.candidates(tuple(ids[:b]))
        for j in [] if candidates is None else candidates.tolist():
            sent = list(vocabulary.words[j]) + ids[b:]
            assert tokenizer(tokenizer.decode(sent), add_special_tokens=False)["input_ids"] == sent
            checked += 1
    assert checked >= 20


def test_a_split_setup_on_a_local_llama_with_a_sentencepiece_tokenizer(tmp_path):
    """The tokenizer as the split code receives it: a local Llama directory (random init) holding
    the in-memory LlamaTokenizer, loaded by atoll (AutoTokenizer), synthetic topic texts cut at 24
    tokens. Its words are read with the "▁" marker, and each sanitiser at a small ε sends corpus
    words that re-tokenise to the ids sent, on 16 training lines (truncated ones included)."""
    from atoll.split.config import split_config_with
    from atoll.split.defenses.words import TokenFacts
    from atoll.split.setup import prepare

    from .helpers import save_causal_lm, split_overrides

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    directory = save_causal_lm(tmp_path / "model", build_sentencepiece_tokenizer("llama"), "llama", sizes)
    setup = prepare(split_config_with(split_overrides(tmp_path / "runs", **{"model.name": str(directory), "data.max_examples": 80})))
    tokenizer = setup.tokenizer
    assert TokenFacts(tokenizer, len(tokenizer), set(tokenizer.all_special_ids)).marker == "▁"
    batch = next(iter(setup.data.eval_batches(setup.party_indices[0][:16], 16)))
    special = set(tokenizer.all_special_ids)
    for name, _, small, fixed in SETTINGS:
        defense = build(name, context_of(setup), epsilon=small, **fixed)
        sent = defense.protect_tokens(batch, 1, "train")
        assert defense.report()["replaced_share"] >= 0.5
        for ids, keep in zip(sent["input_ids"].tolist(), sent["attention_mask"].tolist(), strict=True):
            for a, b in defense.vocabulary.facts.spans(ids, keep):
                assert tuple(ids[a:b]) in defense.vocabulary.index
            real = [t for t, k in zip(ids, keep, strict=True) if k and t not in special]
            assert tokenizer(tokenizer.decode(real), add_special_tokens=False)["input_ids"] == real, name
