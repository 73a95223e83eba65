"""prepare_corpus and TokenDataset: shards, split, meta.json, dtype choice, and damaged folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mamba_training.data import TokenDataset, load_tokenizer, prepare_corpus, read_meta
from mamba_training.errors import DataError

from .conftest import ENGLISH, NON_ASCII


def _all_tokens(ds: TokenDataset) -> np.ndarray:
    return ds.window(0, len(ds))


def test_prepare_folder_writes_shards_split_and_meta(text_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    seen: list[tuple[int, int]] = []
    info = prepare_corpus([text_folder], out, val_fraction=0.1, progress=lambda d, t: seen.append((d, t)))

    expected = (ENGLISH * 300 + NON_ASCII * 200).encode("utf-8")  # a.txt then b_sub/c.md; hidden/binary skipped
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 256 and meta["dtype"] == "uint16"
    assert [Path(s["path"]).name for s in meta["sources"]] == ["a.txt", "c.md"]
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["tokens"] + val["tokens"] == len(expected)
    assert abs(val["tokens"] / len(expected) - 0.1) < 0.02
    for split in (train, val):
        (shard,) = split["shards"]
        assert (out / shard["file"]).stat().st_size == shard["bytes"] == 2 * shard["tokens"]
        assert re.fullmatch(r"[0-9a-f]{64}", shard["sha256"])
    assert seen[-1][0] == seen[-1][1] == sum(s["bytes"] for s in meta["sources"])
    assert info.tokens("train") == train["tokens"]

    # Every token lands in exactly one split, in order, in blocks of block_tokens.
    tr, va = TokenDataset(out, "train"), TokenDataset(out, "val")
    block = meta["block_tokens"]
    rebuilt, t, v = [], _all_tokens(tr), _all_tokens(va)
    is_val = [np.floor((b + 1) * 0.1 + 0.5) > np.floor(b * 0.1 + 0.5) for b in range(-(-len(expected) // block))]
    for b, val_block in enumerate(is_val):
        n = min(block, len(expected) - b * block)
        src = v if val_block else t
        rebuilt.append(src[:n])
        if val_block:
            v = v[n:]
        else:
            t = t[n:]
    assert np.concatenate(rebuilt).astype(np.uint8).tobytes() == expected
    assert sum(is_val) >= 2  # validation is spread through the corpus, not one tail


def test_prepare_is_deterministic_and_replaces_an_earlier_output(text_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare_corpus([text_folder], out)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    prepare_corpus([text_folder], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first


def test_prepare_refuses_an_output_folder_holding_other_files(text_folder: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(text_folder))):
        prepare_corpus([text_folder / "a.txt"], text_folder)
    assert (text_folder / "a.txt").exists()


def test_shards_roll_over_and_windows_cross_shard_boundaries(text_folder: Path, tmp_path: Path) -> None:
    one, many = tmp_path / "one", tmp_path / "many"
    prepare_corpus([text_folder], one)
    info = prepare_corpus([text_folder], many, shard_tokens=5000)
    assert len(info.splits["train"].shards) > 3
    a, b = TokenDataset(one, "train"), TokenDataset(many, "train")
    assert len(a) == len(b)
    assert np.array_equal(b.window(4990, 30), a.window(4990, 30))
    assert np.array_equal(_all_tokens(b), _all_tokens(a))


def test_dtype_is_uint16_for_small_vocabularies_and_uint32_for_large(
    tmp_path: Path, bpe_tokenizer_file: Path, big_vocab_tokenizer_file: Path
) -> None:
    text = tmp_path / "words.txt"
    text.write_text("w69999 w1 w65536 w70 " * 2000)
    small = prepare_corpus([text], tmp_path / "out-small", tokenizer_spec=str(bpe_tokenizer_file))
    assert small.dtype == "uint16"
    assert small.tokenizer == load_tokenizer(str(bpe_tokenizer_file)).name

    big = prepare_corpus([text], tmp_path / "out-big", tokenizer_spec=str(big_vocab_tokenizer_file))
    assert big.dtype == "uint32" and big.vocab_size == 70_001
    train = TokenDataset(tmp_path / "out-big", "train")
    tokens = _all_tokens(train)
    assert tokens.max() == 69_999 and set(np.unique(tokens)) == {1, 70, 65_536, 69_999}
    assert (tmp_path / "out-big" / "train_0000.bin").stat().st_size == 4 * len(train)

    forced = prepare_corpus([text], tmp_path / "forced", dtype="uint32")
    assert forced.dtype == "uint32" and (tmp_path / "forced" / "train_0000.bin").stat().st_size == 4 * forced.tokens("train")
    with pytest.raises(DataError, match="uint16 cannot hold a vocabulary of 70001"):
        prepare_corpus([text], tmp_path / "bad", tokenizer_spec=str(big_vocab_tokenizer_file), dtype="uint16")


def test_missing_corpus_path_is_a_data_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-corpus"
    with pytest.raises(DataError, match=re.escape(str(missing)) + " does not exist"):
        prepare_corpus([missing], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_without_text_tiny_corpus_and_invalid_utf8_are_data_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blob.bin").write_bytes(b"\0\1\2" * 100)
    with pytest.raises(DataError, match=re.escape(str(empty)) + " holds no text files"):
        prepare_corpus([empty], tmp_path / "out")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("tiny")
    with pytest.raises(DataError, match=re.escape(str(tiny)) + " is too small to split: 5 tokens"):
        prepare_corpus([tiny], tmp_path / "out")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(ENGLISH.encode() * 10 + "café".encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(str(latin1)) + " is not valid UTF-8"):
        prepare_corpus([latin1], tmp_path / "out")


def test_truncated_shard_is_a_data_error_naming_the_shard(text_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare_corpus([text_folder], out)
    shard = out / "train_0000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 10])
    with pytest.raises(DataError, match=re.escape(str(shard)) + " is truncated"):
        TokenDataset(out, "train")
    TokenDataset(out, "val")  # the other split is intact and still opens
    shard.unlink()
    with pytest.raises(DataError, match=re.escape(str(shard)) + " is missing"):
        TokenDataset(out, "train")


def test_corrupted_shard_of_the_right_size_fails_its_checksum(text_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare_corpus([text_folder], out)
    shard = out / "val_0000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=re.escape(str(shard)) + " is corrupted"):
        TokenDataset(out, "val")


def test_fast_verification_still_catches_out_of_range_tokens(text_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare_corpus([text_folder], out)
    shard = out / "train_0000.bin"
    tokens = np.fromfile(shard, dtype="<u2")
    tokens[-1] = 300  # beyond the byte vocabulary
    tokens.tofile(shard)
    with pytest.raises(DataError, match=re.escape(str(shard)) + r" is corrupted: token id 300 >= vocab 256"):
        TokenDataset(out, "train", verify="fast")


@pytest.mark.parametrize(
    "damage",
    [
        lambda m: "{ not json",
        lambda m: json.dumps({k: v for k, v in m.items() if k != "splits"}),
        lambda m: json.dumps({**m, "dtype": "float7"}),
        lambda m: json.dumps({**m, "splits": {"train": {"tokens": "many"}}}),
    ],
    ids=["not-json", "missing-splits", "bad-dtype", "bad-split"],
)
def test_corrupted_meta_is_a_data_error_naming_meta_json(text_folder: Path, tmp_path: Path, damage) -> None:
    out = tmp_path / "prepared"
    prepare_corpus([text_folder], out)
    meta_path = out / "meta.json"
    meta_path.write_text(damage(json.loads(meta_path.read_text())))
    with pytest.raises(DataError, match=re.escape(str(meta_path)) + " is corrupted"):
        TokenDataset(out, "train")


def test_meta_missing_means_not_a_prepared_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "meta.json")) + " does not exist"):
        read_meta(tmp_path)
