"""Reading corpus sources: deterministic discovery, gzipped text, and text read in bounded pieces."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from mamba_training.data import sources
from mamba_training.data.sources import find_text_files, read_text_pieces

from .conftest import NON_ASCII


def test_discovery_is_sorted_recursive_and_skips_hidden_and_binary(text_folder: Path) -> None:
    (text_folder / "B.txt").write_text("upper\n")
    (text_folder / ".git").mkdir()
    (text_folder / ".git" / "config").write_text("[core]\n")
    (text_folder / "notes.gz").write_bytes(gzip.compress(b"zipped text\n"))
    found = [p.relative_to(text_folder).as_posix() for p in find_text_files([text_folder])]
    assert found == ["B.txt", "a.txt", "b_sub/c.md", "notes.gz"]
    # Explicit files keep the order given, before or after folders.
    assert find_text_files([text_folder / "a.txt", text_folder / "b_sub"]) == [
        text_folder / "a.txt", text_folder / "b_sub" / "c.md"]


def test_pieces_end_after_newlines_and_join_to_the_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_READ_BYTES", 64)  # tiny pieces, so a small file spans many
    text = (NON_ASCII * 20) + "x" * 300 + "\nlast line without newline"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(read_text_pieces(path))
    assert len(pieces) > 5
    assert "".join(p for p, _ in pieces) == text
    assert sum(n for _, n in pieces) == len(text.encode("utf-8"))
    assert all(p.endswith("\n") for p, _ in pieces[:-1])

    zipped = tmp_path / "t.txt.gz"
    zipped.write_bytes(gzip.compress(text.encode("utf-8")))
    assert "".join(p for p, _ in read_text_pieces(zipped)) == text
