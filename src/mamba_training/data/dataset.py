"""`TokenDataset`: one split of a prepared folder as memory-mapped token shards, verified on open.

Verification, so that a damaged cache or a half-copied folder fails loudly and by name:
`meta.json` must parse; every shard must exist with exactly the recorded size; then either a
full sha256 of every shard (default when the split is at most 1 GiB, ~1 s) or, for bigger
splits, a range check of the first and last million tokens of each shard against the vocabulary.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Literal

import numpy as np

from mamba_training.data.shards import DTYPES, META, PreparedInfo, read_meta
from mamba_training.errors import DataError

_FULL_CHECK_BYTES = 1 << 30
_RANGE_CHECK_TOKENS = 1 << 20


class TokenDataset:
    """The tokens of one split ("train" or "val"), addressed as one long sequence."""

    def __init__(
        self, prepared_dir: str | Path, split: str = "train", verify: Literal["auto", "full", "fast"] = "auto",
    ) -> None:
        self.dir = Path(prepared_dir)
        self.meta: PreparedInfo = read_meta(self.dir)
        if split not in self.meta.splits:
            raise DataError(f"{self.dir / META} has no split {split!r} (it has {', '.join(self.meta.splits)})")
        self.split = split
        info = self.meta.splits[split]
        if info.tokens == 0:
            raise DataError(f"split {split!r} of {self.dir} is empty; prepare it with a val_fraction above 0")
        self.vocab_size = self.meta.vocab_size
        dtype = DTYPES[self.meta.dtype]
        total_bytes = sum(s.bytes for s in info.shards)
        full = verify == "full" or (verify == "auto" and total_bytes <= _FULL_CHECK_BYTES)
        self._shards: list[np.memmap] = []
        for shard in info.shards:
            path = self.dir / shard.file
            _check_size(path, shard.tokens, shard.bytes, dtype)
            if full:
                _check_sha256(path, shard.sha256)
            tokens = np.memmap(path, dtype=dtype, mode="r", shape=(shard.tokens,))
            if not full:
                _check_range(path, tokens, self.vocab_size)
            self._shards.append(tokens)
        if sum(len(s) for s in self._shards) != info.tokens:
            raise DataError(f"{self.dir / META} is corrupted: split {split!r} token count does not add up")
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split, as a fresh int64 array."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside {len(self)} tokens")
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:  # a window crosses into the next shard only at a shard boundary
            begin = start + filled - int(self._starts[i])
            take = min(length - filled, len(self._shards[i]) - begin)
            out[filled:filled + take] = self._shards[i][begin:begin + take]
            filled += take
            i += 1
        return out

    def unigram_entropy(self, base: float = math.e) -> float:
        """Entropy of this split's token distribution, per token (nats by default; base 2: bits).

        It is the loss of the best model that ignores context: a trained model's loss in the same
        units should end well below it.
        """
        return self.meta.splits[self.split].unigram_entropy_nats / math.log(base)


def _check_size(path: Path, tokens: int, size: int, dtype: np.dtype) -> None:
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"token shard {path} is missing") from None
    if size != tokens * dtype.itemsize:
        raise DataError(f"{path.parent / META} is corrupted: shard {path.name} size does not match its token count")
    if actual != size:
        raise DataError(f"token shard {path} is truncated or corrupted: {actual} bytes, expected {size}")


def _check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise DataError(f"token shard {path} is corrupted: its sha256 does not match {path.parent / META}")


def _check_range(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    for part in (tokens[:_RANGE_CHECK_TOKENS], tokens[-_RANGE_CHECK_TOKENS:]):
        if len(part) and int(part.max()) >= vocab_size:
            raise DataError(f"token shard {path} is corrupted: token id {int(part.max())} >= vocab {vocab_size}")
