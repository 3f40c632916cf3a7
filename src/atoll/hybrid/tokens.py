"""What text a token stands for, as bytes, and how a token travels as an OpenAI token string.

Byte-level BPE tokens (GPT-2 style, atoll's own tokenizers) are strings over a 256-character
alphabet that stands for bytes; SentencePiece tokens use U+2581 for a space and ``<0xNN>`` for
byte fallback. Alignment compares tokens by the bytes they produce, never by their ids.

On the wire a token is a string, as in OpenAI's completions ``logprobs``: its UTF-8 text, or
``bytes:\\xNN...`` when its bytes are not valid UTF-8 on their own (part of a multi-byte
character), the convention OpenAI's legacy completions API uses.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

BYTES_PREFIX = "bytes:"
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_ESCAPED_BYTE = re.compile(r"\\x([0-9A-Fa-f]{2})")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    shift = 0
    for value in range(256):
        if value not in printable:
            printable.append(value)
            codes.append(256 + shift)
            shift += 1
    return {chr(code): value for value, code in zip(printable, codes)}


def _decoder_type(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return ""
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type", "")] + [d.get("type", "") for d in decoder.get("decoders", []) or []]
    return "byte_level" if "ByteLevel" in kinds else "metaspace" if ("Metaspace" in kinds or "ByteFallback" in kinds) else ""


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each token id produces when decoded; None for special tokens (pad, bos, eos, unk)."""
    kind = _decoder_type(tokenizer)
    special = set(tokenizer.all_special_ids)
    table = _byte_level_decoder()
    result: list[bytes | None] = []
    for token_id, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in special or piece is None:
            result.append(None)
        elif kind == "byte_level" and all(ch in table for ch in piece):
            result.append(bytes(table[ch] for ch in piece))
        elif kind == "metaspace":
            fallback = _BYTE_FALLBACK.match(piece)
            result.append(bytes([int(fallback.group(1), 16)]) if fallback else piece.replace("\u2581", " ").encode("utf-8"))
        else:
            result.append(tokenizer.convert_tokens_to_string([piece]).encode("utf-8"))
    return result


def to_wire(data: bytes) -> str:
    """A token's bytes as an OpenAI token string."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return BYTES_PREFIX + "".join(f"\\x{b:02x}" for b in data)


def from_wire(text: str) -> bytes | None:
    """An OpenAI token string back to bytes; None when it cannot stand for definite bytes
    (U+FFFD from a server that decoded a partial character, or ``token_id:N`` ids)."""
    if text.startswith(BYTES_PREFIX):
        body = text[len(BYTES_PREFIX) :]
        if _ESCAPED_BYTE.sub("", body):
            return None
        return bytes(int(h, 16) for h in _ESCAPED_BYTE.findall(body))
    if "\ufffd" in text or text.startswith("token_id:"):
        return None
    return text.encode("utf-8")
