"""Fixtures for the data tests: small text corpora and Hugging Face tokenizer files built on the spot."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ENGLISH = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.\n"
)
NON_ASCII = "Café naïve — Grüße, 東京, ½ ∑ 🙂\n"


@pytest.fixture
def text_folder(tmp_path: Path) -> Path:
    """A folder of text (nested, non-ASCII), plus a hidden file and a binary file that prepare skips."""
    root = tmp_path / "corpus"
    (root / "b_sub").mkdir(parents=True)
    (root / "a.txt").write_text(ENGLISH * 300, encoding="utf-8")  # 56,700 bytes
    (root / "b_sub" / "c.md").write_text(NON_ASCII * 200, encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden " * 1000, encoding="utf-8")
    (root / "image.bin").write_bytes(bytes(range(256)) * 10)
    return root


@pytest.fixture
def bpe_tokenizer_file(tmp_path: Path) -> Path:
    """A tiny byte-level BPE tokenizer (vocab ~300) saved as tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([ENGLISH * 20, NON_ASCII * 5], trainer)
    path = tmp_path / "bpe" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


@pytest.fixture
def big_vocab_tokenizer_file(tmp_path: Path) -> Path:
    """A word-level tokenizer whose vocabulary (70,001) does not fit in uint16."""
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = 70_000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "big" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path
