"""Tokenizers: byte-level round trips, Hugging Face tokenizers JSON files, and bad tokenizer files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from mamba_training.data import ByteTokenizer, load_tokenizer
from mamba_training.errors import DataError

from .conftest import ENGLISH, NON_ASCII


def test_byte_tokenizer_round_trips_non_ascii_text() -> None:
    tok = load_tokenizer("byte")
    text = ENGLISH + NON_ASCII
    ids = tok.encode(text)
    assert tok.name == "byte" and tok.vocab_size == 256
    assert ids == list(text.encode("utf-8"))
    assert len(ids) > len(text)  # multi-byte characters became several tokens
    assert tok.decode(ids) == text
    assert np.array_equal(tok.encode_array(text), np.asarray(ids))


def test_byte_tokenizer_decodes_invalid_utf8_without_failing() -> None:
    # A sampled model can emit half a character; decoding must show it, not raise.
    assert ByteTokenizer().decode([0x48, 0xC3]) == "H\ufffd"


def test_hf_tokenizer_file_round_trips_and_is_named_by_content(bpe_tokenizer_file: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(str(bpe_tokenizer_file))
    text = ENGLISH + NON_ASCII
    ids = tok.encode(text)
    assert re.fullmatch(r"hf:[0-9a-f]{16}", tok.name)
    assert 256 < tok.vocab_size <= 300
    assert max(ids) < tok.vocab_size
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned and used
    assert tok.decode(ids) == text
    # The same file under another path has the same name: caches key on content, not location.
    copy = tmp_path / "elsewhere.json"
    copy.write_bytes(bpe_tokenizer_file.read_bytes())
    assert load_tokenizer(str(copy)).name == tok.name


def test_hf_tokenizer_encodes_long_text_in_pieces_like_whole(bpe_tokenizer_file: Path) -> None:
    from mamba_training.data import tokenizer as tokenizer_module

    tok = load_tokenizer(str(bpe_tokenizer_file))
    text = ENGLISH * 50
    whole = tok.encode(text)
    pieces = tokenizer_module._split_after_newlines(text, 1000)
    assert len(pieces) > 1 and "".join(pieces) == text and all(p.endswith("\n") for p in pieces)
    assert sum((tok.encode(p) for p in pieces), []) == whole


def test_missing_tokenizer_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokenizer.json"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_tokenizer(str(missing))


def test_invalid_tokenizer_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": "not a tokenizer"}')
    with pytest.raises(DataError, match=re.escape(str(bad)) + ".*not a valid tokenizers JSON"):
        load_tokenizer(str(bad))
