"""Finding and reading the text files of a corpus: files and folders, plain or gzipped.

Order is deterministic: sources in the order given; inside a folder, files sorted by their path
relative to it. Folders are walked recursively; hidden files and folders are skipped, and so are
files that do not look like UTF-8 text (a NUL byte or invalid UTF-8 in their first 8 KiB).
A file named explicitly is always read, and invalid UTF-8 in any file read is an error.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator
from pathlib import Path

from mamba_training.errors import DataError

log = logging.getLogger(__name__)

_SNIFF_BYTES = 8192
# Text is read in pieces of about this size, cut after a newline, to bound memory on big files.
_READ_BYTES = 16 << 20


def find_text_files(sources: list[str | Path], exclude: Path | None = None) -> list[Path]:
    """Every text file under `sources`, in a deterministic order; a missing path is a DataError."""
    if not sources:
        raise DataError("no corpus source given")
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"corpus path {source} does not exist")
        if path.is_file():
            files.append(path)
            continue
        found = [f for f in _walk(path, exclude) if _looks_like_text(f)]
        if not found:
            raise DataError(f"corpus folder {source} holds no text files")
        files.extend(found)
    return files


def read_text_pieces(path: Path) -> Iterator[tuple[str, int]]:
    """The text of `path` in pieces of about 16 MiB that each end after a newline, with their size in bytes."""
    try:
        with _open(path) as stream:
            offset, carry = 0, b""
            while True:
                chunk = stream.read(_READ_BYTES)
                if not chunk:
                    break
                data = carry + chunk
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no newline yet: keep reading, a line cannot be split safely
                    carry = data
                    continue
                yield _decode(data[:cut], path, offset), cut
                offset += cut
                carry = data[cut:]
            if carry:
                yield _decode(carry, path, offset), len(carry)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"corpus file {path} cannot be read: {error}") from None


def _walk(folder: Path, exclude: Path | None) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if exclude is not None and path.resolve().is_relative_to(exclude.resolve()):
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _looks_like_text(path: Path) -> bool:
    try:
        with _open(path) as stream:
            head = stream.read(_SNIFF_BYTES)
    except (OSError, EOFError, gzip.BadGzipFile):
        log.info("skipping %s: unreadable", path)
        return False
    if b"\0" in head:
        log.info("skipping %s: binary", path)
        return False
    for trim in range(4):  # the sniffed block may end inside a multi-byte character
        try:
            head[: len(head) - trim].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    log.info("skipping %s: not UTF-8 text", path)
    return False


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _decode(data: bytes, path: Path, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"corpus file {path} is not valid UTF-8 (byte {offset + error.start}); convert it to UTF-8"
        ) from None
