"""Tokenizer from `tokenizer.json` (Hugging Face `tokenizers`), plus streaming detokenization."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer

from vlm_export.errors import ManifestError


class TextTokenizer:
    def __init__(self, path: Path):
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception
            raise ManifestError(f"cannot load tokenizer {path}: {error}; re-export the model") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of an already-templated prompt: special tokens are in the text, none are added."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def backend(self) -> Tokenizer:
        """The `tokenizers.Tokenizer` itself (for `tokenizers.decoders.DecodeStream`)."""
        return self._tokenizer

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a byte-level BPE token may hold part of a UTF-8 character, which
        `decode` would show as U+FFFD); other tokenizers: the UTF-8 of its decoded text."""
        piece = self._tokenizer.id_to_token(int(token_id))
        if piece is not None and self._byte_level:
            table = _byte_level_decoder()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        return self.decode([int(token_id)], skip_special_tokens=False).encode("utf-8")

    @functools.cached_property
    def _byte_level(self) -> bool:
        return json.loads(self._tokenizer.to_str()).get("decoder", {}).get("type") == "ByteLevel"

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (`bytes_to_unicode`), inverted: the character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class StreamDecoder:
    """Turns a growing list of token ids into text pieces; holds back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece
