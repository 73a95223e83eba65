"""Turning the `data.corpus` setting into a prepared folder: bundled text, a prepared folder, or text.

Text is prepared once into `cache_dir/<key>`, where the key hashes the source files (paths,
sizes, modification times), the tokenizer's content-derived name, the validation fraction and
the token dtype; later runs reuse it. Preparation writes a private temporary folder and renames
it into place, which is atomic: processes that race (several torchrun ranks, two jobs) each get
a complete folder, and the loser of the rename discards its copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from importlib import resources
from pathlib import Path

from mamba_training.data.shards import FORMAT_VERSION, META, prepare_corpus
from mamba_training.data.sources import find_text_files
from mamba_training.data.tokenizer import load_tokenizer
from mamba_training.errors import DataError

log = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_FILE = "shakespeare.txt.gz"


def bundled_corpus_path() -> Path:
    """The bundled corpus: 21 Shakespeare plays, ~2.6 MB of text (see data/corpus/SOURCE.md)."""
    return Path(str(resources.files("mamba_training.data") / "corpus" / BUNDLED_FILE))


def resolve_corpus(
    corpus: str, tokenizer_spec: str, val_fraction: float, cache_dir: str | Path, dtype: str = "auto",
) -> Path:
    """A prepared folder for `corpus` ("bundled", a prepared folder, or text files/folders)."""
    if corpus == BUNDLED:
        sources = [bundled_corpus_path()]
    else:
        path = Path(corpus).expanduser()
        if not path.exists():
            raise DataError(f"corpus path {corpus} does not exist")
        if path.is_dir() and (path / META).exists():
            return path
        sources = [path]
    cache = Path(cache_dir).expanduser()
    target = cache / cache_key(sources, tokenizer_spec, val_fraction, dtype)
    if (target / META).exists():
        return target
    return _prepare_into(sources, target, tokenizer_spec, val_fraction, dtype)


def cache_key(sources: list[Path], tokenizer_spec: str, val_fraction: float, dtype: str) -> str:
    files = find_text_files(sources)
    description = {
        "format": FORMAT_VERSION,
        "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "tokenizer": load_tokenizer(tokenizer_spec).name,
        "val_fraction": val_fraction,
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def _prepare_into(sources: list[Path], target: Path, tokenizer_spec: str, val_fraction: float, dtype: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log.info("preparing corpus %s into %s", ", ".join(map(str, sources)), target)
    try:
        prepare_corpus(sources, tmp, tokenizer_spec=tokenizer_spec, val_fraction=val_fraction, dtype=dtype)
        _discard_incomplete(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / META).exists():
                raise
            log.info("another process prepared %s first; using its copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _discard_incomplete(target: Path) -> None:
    """A target without meta.json is debris from an older, interrupted layout: move it away."""
    if target.exists() and not (target / META).exists():
        trash = target.parent / f".{target.name}.trash-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(target, trash)
        except OSError:
            return  # someone else moved or filled it; the rename below decides
        shutil.rmtree(trash, ignore_errors=True)
