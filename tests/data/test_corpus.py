"""The bundled corpus and resolve_corpus: real English text, caching, prepared folders, races."""

from __future__ import annotations

import gzip
import re
import threading
from collections import Counter
from pathlib import Path

import pytest

from mamba_training.data import TokenDataset, bundled_corpus_path, prepare_corpus, resolve_corpus
from mamba_training.data import corpus as corpus_module
from mamba_training.errors import DataError


def test_bundled_corpus_is_real_public_domain_english_of_modest_size() -> None:
    path = bundled_corpus_path()
    assert path.stat().st_size <= 3_000_000
    assert (path.parent / "SOURCE.md").read_text().count("public domain") >= 1
    text = gzip.decompress(path.read_bytes()).decode("utf-8")
    assert 1_000_000 <= len(text) <= 3_000_000
    words = Counter(re.findall(r"[a-z]+", text.lower()))
    top = [w for w, _ in words.most_common(12)]
    assert {"the", "and", "to", "of", "i", "you"} <= set(top)
    assert len(words) > 15_000  # a real vocabulary, not a repeated snippet
    assert "To be, or not to be" in text and "Project Gutenberg" not in text


def test_bundled_corpus_prepares_with_a_sane_unigram_entropy(tmp_path: Path) -> None:
    prepared = resolve_corpus("bundled", "byte", 0.05, tmp_path / "cache")
    train, val = TokenDataset(prepared, "train"), TokenDataset(prepared, "val")
    assert 2_000_000 < len(train) and 0.04 < len(val) / (len(train) + len(val)) < 0.06
    # English bytes: about 4.8 bits (3.3 nats) per character; uniform bytes would be ln 256 = 5.5.
    for split in (train, val):
        assert 3.0 < split.unigram_entropy() < 3.7
        assert split.unigram_entropy(base=2) == pytest.approx(split.unigram_entropy() / 0.6931471805599453)


def test_text_corpus_is_prepared_once_and_reused(text_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = resolve_corpus(str(text_folder), "byte", 0.05, cache)
    stamp = (first / "meta.json").stat().st_mtime_ns
    again = resolve_corpus(str(text_folder), "byte", 0.05, cache)
    assert again == first and (again / "meta.json").stat().st_mtime_ns == stamp
    assert TokenDataset(again, "train").meta.val_fraction == 0.05
    # Anything that changes the tokens gets its own folder.
    assert resolve_corpus(str(text_folder), "byte", 0.1, cache) != first
    (text_folder / "a.txt").write_text("changed text\n" * 1000)
    assert resolve_corpus(str(text_folder), "byte", 0.05, cache) != first
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_prepared_folder_is_used_as_is(text_folder: Path, tmp_path: Path) -> None:
    prepared = tmp_path / "prepared"
    prepare_corpus([text_folder], prepared)
    assert resolve_corpus(str(prepared), "byte", 0.05, tmp_path / "cache") == prepared
    assert not (tmp_path / "cache").exists()


def test_missing_corpus_path_is_a_data_error_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere" / "corpus.txt")
    with pytest.raises(DataError, match=re.escape(missing) + " does not exist"):
        resolve_corpus(missing, "byte", 0.05, tmp_path / "cache")


def test_racing_preparations_both_get_one_complete_folder(text_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    source = [text_folder]
    key = corpus_module.cache_key(source, "byte", 0.05, "auto")
    # The loser of the race: the target appears between its check and its rename.
    winner = corpus_module._prepare_into(source, cache / key, "byte", 0.05, "auto")
    stamp = (winner / "meta.json").stat().st_mtime_ns
    loser = corpus_module._prepare_into(source, cache / key, "byte", 0.05, "auto")
    assert loser == winner and (winner / "meta.json").stat().st_mtime_ns == stamp

    # And truly concurrent callers (as torchrun ranks would be) agree on a complete folder.
    results: list[Path] = []
    barrier = threading.Barrier(3)

    def call() -> None:
        barrier.wait()
        results.append(resolve_corpus(str(text_folder), "byte", 0.2, cache))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    TokenDataset(results[0], "train")  # verifies sizes and checksums
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
