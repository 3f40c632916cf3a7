"""Vocabulary alignment between two different byte-level BPE tokenizers, through token bytes."""

from __future__ import annotations

import math

import pytest
from transformers import AutoTokenizer

from atoll.hybrid.tokens import from_wire, to_wire, token_bytes
from atoll.hybrid.vocab import EdgeVocabulary, overlap


@pytest.fixture(scope="module")
def tokenizers(tiny_pair):
    return AutoTokenizer.from_pretrained(tiny_pair["edge"]), AutoTokenizer.from_pretrained(tiny_pair["cloud"])


def test_token_bytes_reassemble_the_decoded_text(tokenizers):
    edge, _ = tokenizers
    surface = token_bytes(edge)
    text = "What is this text about? café — naïve"
    ids = edge(text, add_special_tokens=False)["input_ids"]
    assert b"".join(surface[i] for i in ids).decode("utf-8") == text
    assert all(surface[i] is None for i in edge.all_special_ids)


def test_wire_strings_round_trip_bytes_including_partial_characters():
    for data in (b" hello", b"\xc3", b"\xe2\x80", "é".encode()):
        assert from_wire(to_wire(data)) == data
    assert to_wire(b"\xc3") == "bytes:\\xc3"
    assert from_wire("\ufffd") is None and from_wire("token_id:17") is None


def test_the_two_tokenizers_differ_and_shared_tokens_map_to_identical_bytes(tokenizers):
    edge, cloud = tokenizers
    stats = overlap(edge, cloud)
    assert stats["edge_tokens"] != stats["cloud_tokens"]
    assert 0 < stats["shared_tokens"] < min(stats["edge_tokens"], stats["cloud_tokens"])
    vocab = EdgeVocabulary(edge)
    cloud_surface = token_bytes(cloud)
    shared = prefixed = 0
    for data in cloud_surface:
        if not data:
            continue
        token_id, how = vocab.map_string(to_wire(data))
        if how == "shared":
            assert vocab.bytes_of[token_id] == data
            shared += 1
        else:
            assert how == "prefix"  # a byte-level edge always has at least the first byte
            piece = vocab.bytes_of[token_id]
            assert data.startswith(piece) and len(piece) < len(data)
            # and it is the longest such edge token
            assert not any(data.startswith(b) and len(b) > len(piece) for b in vocab.id_of)
            prefixed += 1
    assert shared == stats["shared_tokens"] and prefixed > 0


def test_drop_policy_eos_and_unmappable_strings(tokenizers):
    edge, cloud = tokenizers
    cloud_only = next(b for b in token_bytes(cloud) if b and b not in set(filter(None, token_bytes(edge))))
    dropping = EdgeVocabulary(edge, unshared="drop")
    assert dropping.map_string(to_wire(cloud_only)) == (None, "dropped")
    vocab = EdgeVocabulary(edge, eos_strings=["<|endoftext|>"])
    assert vocab.map_string("<|endoftext|>") == (edge.eos_token_id, "eos")
    assert vocab.map_string(edge.eos_token) == (edge.eos_token_id, "eos")
    assert vocab.map_string("\ufffd")[1] == "dropped" and vocab.map_string("")[1] == "dropped"


def test_align_sums_strings_that_land_on_one_edge_token(tokenizers):
    edge, _ = tokenizers
    vocab = EdgeVocabulary(edge)
    the = vocab.id_of[b" the"]
    # " theatre" is not an edge token: its mass joins " the" (prefix); the U+FFFD string is dropped
    assert b" theatre" not in vocab.id_of
    aligned = vocab.align([(" the", math.log(0.4)), (" theatre", math.log(0.2)), ("\ufffd", math.log(0.1))])
    assert aligned.ids.tolist() == [the]
    assert math.exp(float(aligned.logprobs[0])) == pytest.approx(0.6)
    assert aligned.topk_mass == pytest.approx(0.7) and aligned.residual_mass == pytest.approx(0.3)
    assert aligned.counts == {"shared": 1, "prefix": 1, "eos": 0, "dropped": 1}
