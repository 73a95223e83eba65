"""Tokenizers: UTF-8 bytes by default, or a local Hugging Face `tokenizers` JSON file.

A tokenizer's `name` is stable and content-derived ("byte", "hf:<16 hex of the file's sha256>"),
so prepared token shards and caches are keyed by what the tokenizer does, not where it lives.
Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

from mamba_training.errors import DataError

# Long texts are encoded in pieces of about this many characters, cut just after a newline,
# so that memory stays bounded and the Rust tokenizer can work on pieces in parallel.
_PIECE_CHARS = 1 << 20


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_array(self, text: str) -> np.ndarray: ...


class ByteTokenizer:
    """Token = one UTF-8 byte. Vocabulary 256; every string round-trips."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        # A model may emit a byte sequence that is not valid UTF-8: show it, don't fail.
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file (tokenizer.json), read from a local path."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _RustTokenizer

        try:
            raw = path.read_bytes()
        except OSError as error:
            raise DataError(f"tokenizer file {path} cannot be read: {error.strerror or error}") from None
        try:
            self._tok = _RustTokenizer.from_str(raw.decode("utf-8"))
        except Exception as error:  # the Rust side raises plain Exception subclasses
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DataError(f"tokenizer file {path} is not a valid tokenizers JSON file: {reason}") from None
        self.path = path
        self.name = "hf:" + hashlib.sha256(raw).hexdigest()[:16]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        pieces = _split_after_newlines(text, _PIECE_CHARS)
        encodings = self._tok.encode_batch(pieces, add_special_tokens=False)
        arrays = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """"byte" -> ByteTokenizer; anything else is the path of a tokenizers JSON file."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"tokenizer file {spec} does not exist (data.tokenizer is 'byte' or a tokenizer.json path)")
    return HFTokenizer(path)


def _split_after_newlines(text: str, size: int) -> list[str]:
    """Cut `text` into pieces of about `size` characters, each ending just after a newline."""
    if len(text) <= size:
        return [text] if text else []
    pieces, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut >= start else end
        pieces.append(text[start:end])
        start = end
    return pieces
