"""Token shards on disk: `prepare_corpus` writes them, `read_meta` reads their description.

A prepared folder holds `train_NNNN.bin` and `val_NNNN.bin` (raw little-endian uint16, or
uint32 when the vocabulary exceeds 65,536) and `meta.json`, written last, which lists every
shard with its token count, size and sha256. Output is a pure function of the inputs: the same
sources and tokenizer give byte-identical folders.

Train/validation split: the token stream of all sources, in order, is cut into blocks of
`block_tokens` (4096, fewer for tiny corpora); evenly spaced blocks, a `val_fraction` share of
them, go to validation. So validation samples the whole corpus, not only its last file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mamba_training.data.sources import find_text_files, read_text_pieces
from mamba_training.data.tokenizer import Tokenizer, load_tokenizer
from mamba_training.errors import DataError

FORMAT_VERSION = 1
META = "meta.json"
SPLITS = ("train", "val")
SHARD_TOKENS = 1 << 27  # 256 MiB per uint16 shard: large files, few of them
_BLOCK_TOKENS = 4096
_MIN_BLOCKS = 256  # a tiny corpus still gets this many blocks, so it still gets a validation split
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


@dataclass(frozen=True)
class ShardInfo:
    file: str
    tokens: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    tokens: int
    unigram_entropy_nats: float
    shards: list[ShardInfo]


@dataclass(frozen=True)
class PreparedInfo:
    """What `prepare_corpus` wrote; the same fields as `meta.json`."""

    out_dir: Path
    tokenizer: str
    tokenizer_spec: str
    vocab_size: int
    dtype: str
    val_fraction: float
    block_tokens: int
    sources: list[dict[str, Any]]
    splits: dict[str, SplitInfo] = field(default_factory=dict)

    def tokens(self, split: str) -> int:
        return self.splits[split].tokens

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["out_dir"]
        return {"format": FORMAT_VERSION, "byte_order": "little", **data}


def prepare_corpus(
    sources: list[str | Path],
    out_dir: str | Path,
    tokenizer_spec: str = "byte",
    val_fraction: float = 0.05,
    dtype: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    shard_tokens: int = SHARD_TOKENS,
) -> PreparedInfo:
    """Tokenize text files/folders into train/val token shards plus meta.json under `out_dir`.

    `progress(done, total)` is called with source bytes read so far and in all.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction} must be in [0, 1)")
    out = Path(out_dir)
    files = find_text_files(sources, exclude=out)
    tokenizer = load_tokenizer(tokenizer_spec)
    np_dtype = _choose_dtype(dtype, tokenizer.vocab_size)
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    block = max(1, min(_BLOCK_TOKENS, total // _MIN_BLOCKS))
    _clear_output(out)

    writers = {s: _SplitWriter(out, s, np_dtype, tokenizer.vocab_size, shard_tokens) for s in SPLITS}
    router = _SplitRouter(block, val_fraction)
    try:
        _tokenize_into(files, sizes, tokenizer, writers, router, progress)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    splits = {s: w.close() for s, w in writers.items()}
    if splits["train"].tokens == 0 or (val_fraction > 0 and splits["val"].tokens == 0):
        raise DataError(f"corpus {', '.join(map(str, sources))} is too small to split: {router.position} tokens")
    info = PreparedInfo(
        out_dir=out, tokenizer=tokenizer.name, tokenizer_spec=tokenizer_spec, vocab_size=tokenizer.vocab_size,
        dtype=np_dtype.name, val_fraction=val_fraction, block_tokens=block,
        sources=[{"path": str(f), "bytes": s} for f, s in zip(files, sizes)], splits=splits,
    )
    _write_json_atomic(out / META, info.to_json())
    return info


def _tokenize_into(
    files: list[Path], sizes: list[int], tokenizer: Tokenizer, writers: dict[str, _SplitWriter],
    router: _SplitRouter, progress: Callable[[int, int], None] | None,
) -> None:
    done, total = 0, sum(sizes)
    for path, size in zip(files, sizes):
        read = 0
        for piece, n_bytes in _with_final_newline(read_text_pieces(path)):
            ids = tokenizer.encode_array(piece)
            is_val = router.route(len(ids))
            writers["train"].write(ids[~is_val])
            writers["val"].write(ids[is_val])
            read += n_bytes
            if progress is not None:  # gzip pieces count uncompressed bytes: cap at the file's size
                progress(done + min(read, size), total)
        done += size
        if progress is not None:
            progress(done, total)


def read_meta(prepared_dir: str | Path) -> PreparedInfo:
    """Parse and check `meta.json`; anything missing or malformed is a DataError naming it."""
    path = Path(prepared_dir) / META
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: not a prepared corpus folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is corrupted: {error}") from None
    try:
        if data["format"] != FORMAT_VERSION:
            raise DataError(f"{path} has format {data['format']!r}; this version reads {FORMAT_VERSION}")
        if data["dtype"] not in DTYPES:
            raise ValueError(f"unknown dtype {data['dtype']!r}")
        splits = {
            name: SplitInfo(
                tokens=int(s["tokens"]), unigram_entropy_nats=float(s["unigram_entropy_nats"]),
                shards=[ShardInfo(str(h["file"]), int(h["tokens"]), int(h["bytes"]), str(h["sha256"]))
                        for h in s["shards"]],
            )
            for name, s in data["splits"].items()
        }
        return PreparedInfo(
            out_dir=Path(prepared_dir), tokenizer=str(data["tokenizer"]), tokenizer_spec=str(data["tokenizer_spec"]),
            vocab_size=int(data["vocab_size"]), dtype=data["dtype"], val_fraction=float(data["val_fraction"]),
            block_tokens=int(data["block_tokens"]), sources=list(data["sources"]), splits=splits,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise DataError(f"{path} is corrupted: bad or missing field {error}") from None


class _SplitRouter:
    """Assigns each position of the global token stream to train or validation, by block."""

    def __init__(self, block: int, val_fraction: float) -> None:
        self.block, self.fraction, self.position = block, val_fraction, 0

    def route(self, n: int) -> np.ndarray:
        blocks = (self.position + np.arange(n, dtype=np.int64)) // self.block
        self.position += n
        # Block b is validation when the running count round(b * f) steps up at b: evenly spaced,
        # the first one near the middle of the first 1/f blocks.
        return np.floor((blocks + 1) * self.fraction + 0.5) > np.floor(blocks * self.fraction + 0.5)


class _SplitWriter:
    """Appends tokens to `<split>_NNNN.bin` files, hashing and counting as it goes."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, vocab_size: int, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        self.shards: list[ShardInfo] = []
        self._file = None
        self._hash = hashlib.sha256()
        self._tokens = 0

    def write(self, ids: np.ndarray) -> None:
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self.counts)):
            raise DataError(f"tokenizer produced id {int(ids.max())} outside its vocabulary of {len(self.counts)}")
        self.counts += np.bincount(ids, minlength=len(self.counts)) if len(ids) else 0
        data = ids.astype(self.dtype, copy=False)
        while len(data):
            if self._file is None:
                self._open()
            take = min(len(data), self.shard_tokens - self._tokens)
            raw = data[:take].tobytes()
            self._file.write(raw)
            self._hash.update(raw)
            self._tokens += take
            data = data[take:]
            if self._tokens == self.shard_tokens:
                self._finish_shard()

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> SplitInfo:
        if self._file is not None:
            self._finish_shard()
        total = int(self.counts.sum())
        return SplitInfo(tokens=total, unigram_entropy_nats=entropy_nats(self.counts), shards=self.shards)

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):04d}.bin"
        self._file = (self.out / name).open("wb")
        self._hash, self._tokens = hashlib.sha256(), 0

    def _finish_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = Path(self._file.name).name
        self.shards.append(ShardInfo(name, self._tokens, self._tokens * self.dtype.itemsize, self._hash.hexdigest()))
        self._file = None


def entropy_nats(counts: np.ndarray) -> float:
    """Shannon entropy, in nats, of the distribution given by `counts`."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def _choose_dtype(dtype: str, vocab_size: int) -> np.dtype:
    if dtype == "auto":
        return DTYPES["uint16"] if vocab_size <= 1 << 16 else DTYPES["uint32"]
    if dtype not in DTYPES:
        raise DataError(f"token dtype {dtype!r} is not one of auto, uint16, uint32")
    if dtype == "uint16" and vocab_size > 1 << 16:
        raise DataError(f"token dtype uint16 cannot hold a vocabulary of {vocab_size}; use uint32 or auto")
    return DTYPES[dtype]


def _with_final_newline(pieces: Iterator[tuple[str, int]]) -> Iterator[tuple[str, int]]:
    """Yield the pieces, making sure the document ends with a newline so files don't run together."""
    last = None
    for piece, n_bytes in pieces:
        last = piece
        yield piece, n_bytes
    if last is not None and not last.endswith("\n"):
        yield "\n", 0


def _clear_output(out: Path) -> None:
    """Make `out` an empty folder; the files of an earlier (or interrupted) preparation are removed."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    entries = list(out.iterdir())
    foreign = [p.name for p in entries if not _is_ours(p.name)]
    if foreign:
        raise DataError(f"output folder {out} holds other files ({', '.join(sorted(foreign)[:3])}); choose another")
    if (out / META).exists():
        (out / META).unlink()  # first, so a crash below leaves no folder that claims to be complete
    for path in entries:
        path.unlink(missing_ok=True)


def _is_ours(name: str) -> bool:
    return name in (META, META + ".tmp") or bool(re.fullmatch(r"(train|val)_\d{4,}\.bin", name))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
