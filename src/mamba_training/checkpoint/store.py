"""Run stores: where a run's files live. A local directory (the default) or an S3 prefix.

Keys are '/'-separated paths relative to the run root. Both backends give the same guarantees:
whole-object writes that are atomic for readers, and `put_if`, a conditional write that only one
of several racing writers can win (S3: If-None-Match / If-Match; local: lock file + atomic rename).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from mamba_training.errors import FencedError, StoreError

Progress = Callable[[int], None]  # called with the number of bytes just transferred

_CHUNK = 1 << 20
_CONFLICT_RETRIES = 6  # 409s on one conditional write before giving up (~3 s of backoff)


class NotFound(StoreError):
    """The key does not exist in the store."""


class StoreUrlError(StoreError):
    """A store URL we cannot use: bad input, so exit 2."""

    exit_code = 2


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float  # seconds since the epoch


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


class Store(ABC):
    url: str

    def describe(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes | memoryview, progress: Progress | None = None) -> None:
        """Write a whole object from memory (large ones go up in parallel parts on S3)."""

    @abstractmethod
    def put_file(self, key: str, local_path: Path, progress: Progress | None = None) -> None: ...

    @abstractmethod
    def get_file(self, key: str, local_path: Path, progress: Progress | None = None) -> None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...

    @abstractmethod
    def delete(self, keys: list[str]) -> None: ...

    @abstractmethod
    def read_with_etag(self, key: str) -> tuple[bytes, str] | None: ...

    @abstractmethod
    def put_if(self, key: str, data: bytes, etag: str | None) -> str:
        """Write `key` only if its current ETag is `etag` (None: only if absent); return the new ETag.

        Raises FencedError when another writer got there first.
        """

    def local_path(self, key: str) -> Path | None:
        """A path readers can open directly, for stores that are already on this machine."""
        return None


# --------------------------------------------------------------------------- local
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_error(error: OSError, where: str) -> StoreError:
    if error.errno == errno.ENOSPC:
        return StoreError(f"no space left on device writing {where}")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StoreError(f"permission denied writing {where}")
    return StoreError(f"cannot write {where}: {error.strerror or error}")


def _bytes_writer(data: bytes | memoryview, progress: Progress | None = None) -> Callable[[int], None]:
    def write(fd: int) -> None:
        view = memoryview(data).cast("B")
        while view:
            done = os.write(fd, view[:_CHUNK])
            view = view[done:]
            if progress:
                progress(done)

    return write


class _MemoryReader(io.RawIOBase):
    """A seekable file over a memoryview, so s3transfer uploads from memory without a copy of it all."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        buffer[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n


class LocalStore(Store):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{self.describe(key)} does not exist") from None
        except IsADirectoryError:
            raise NotFound(f"{self.describe(key)} is a directory") from None

    def _atomic_write(self, key: str, write: Callable[[int], None]) -> None:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            try:
                write(fd)
                os.fsync(fd)
                os.close(fd)
                fd = -1
                os.replace(tmp, target)
                _fsync_dir(target.parent)
            finally:
                if fd >= 0:
                    os.close(fd)
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as error:
            raise _disk_error(error, self.describe(key)) from None

    def put_bytes(self, key: str, data: bytes | memoryview, progress: Progress | None = None) -> None:
        self._atomic_write(key, _bytes_writer(data, progress))

    def put_file(self, key: str, local_path: Path, progress: Progress | None = None) -> None:
        source = Path(local_path)
        if source.resolve() == self._path(key).resolve():
            return

        def write(fd: int) -> None:
            with open(source, "rb") as fh:
                for block in iter(lambda: fh.read(_CHUNK), b""):
                    view = memoryview(block)
                    while view:
                        view = view[os.write(fd, view):]
                    if progress:
                        progress(len(block))

        self._atomic_write(key, write)

    def get_file(self, key: str, local_path: Path, progress: Progress | None = None) -> None:
        source = self._path(key)
        if not source.is_file():
            raise NotFound(f"{self.describe(key)} does not exist")
        target = Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                for block in iter(lambda: src.read(_CHUNK), b""):
                    dst.write(block)
                    if progress:
                        progress(len(block))
            os.replace(tmp, target)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise _disk_error(error, str(target)) from None

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.root / prefix if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.is_dir():
            return []
        found = []
        for path in start.rglob("*"):
            key = path.relative_to(self.root).as_posix()
            # Hidden names are ours (temp files mid-rename, locks): never objects.
            if not path.is_file() or any(part.startswith(".") for part in key.split("/")):
                continue
            if key.startswith(prefix):
                stat = path.stat()
                found.append(ObjectInfo(key, stat.st_size, stat.st_mtime))
        return sorted(found, key=lambda o: o.key)

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            parent = path.parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    def read_with_etag(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def put_if(self, key: str, data: bytes, etag: str | None) -> str:
        # Lock files live in a hidden folder so they never show up in listings or block rmdir.
        lock_path = self.root / ".locks" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(lock_path, "a")
        except OSError as error:
            raise _disk_error(error, self.describe(key)) from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read_with_etag(key)
            current_etag = current[1] if current else None
            if current_etag != etag:
                raise FencedError(
                    f"{self.describe(key)} was changed by another writer "
                    f"(expected {'no object' if etag is None else 'ETag ' + etag[:12]}): this writer stops"
                )
            self._atomic_write(key, _bytes_writer(data))
            return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- S3
def _client_error_code(error: Exception) -> tuple[str, int]:
    response = getattr(error, "response", {}) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if not code:  # boto3's S3UploadFailedError wraps the ClientError in its message only
        found = re.search(r"An error occurred \((\w+)\)", str(error))
        code = found.group(1) if found else ""
    return code, status


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, region: str | None = None, profile: str | None = None,
                 part_size: int = 16 * _CHUNK, concurrency: int = 8, max_attempts: int = 8) -> None:
        from boto3.s3.transfer import TransferConfig

        from mamba_training.aws.session import client

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        # botocore's standard retry mode retries throttling, 5xx and dropped connections with
        # exponential backoff; a checkpoint upload is worth a few more attempts than the default.
        self._client = client("s3", region=region, profile=profile, max_pool_connections=32, connect_timeout=5,
                              read_timeout=60, retries={"mode": "standard", "max_attempts": max_attempts})
        # Files above one part go up as a multipart upload, `concurrency` parts at a time.
        self._transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                                        max_concurrency=concurrency, use_threads=True)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, error: Exception, key: str) -> StoreError:
        from botocore.exceptions import (
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
            ReadTimeoutError,
        )

        where = self.describe(key) if key else self.url
        if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
            return StoreUrlError(f"no AWS credentials found for {where} (set AWS_PROFILE or AWS_ACCESS_KEY_ID)")
        if isinstance(error, (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError)):
            return StoreError(f"cannot reach S3 for {where}: {error}")
        code, status = _client_error_code(error)
        if code == "NoSuchBucket":
            return StoreError(f"bucket {self.bucket!r} does not exist ({where})")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFound(f"{where} does not exist")
        if code in ("AccessDenied", "403", "Forbidden") or status == 403:
            from mamba_training.aws.session import plain_http_hint

            return StoreError(f"access denied to {where}{plain_http_hint()}")
        text = " ".join(str(error).split())
        return StoreError(f"S3 error on {where}: {text or code or type(error).__name__}")

    def _call(self, key: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # botocore raises many types; all become one-line StoreErrors
            if isinstance(error, StoreError):
                raise
            raise self._error(error, key) from None

    def exists(self, key: str) -> bool:
        try:
            self._call(key, self._client.head_object, Bucket=self.bucket, Key=self._key(key))
            return True
        except NotFound:
            return False

    def get_bytes(self, key: str) -> bytes:
        response = self._call(key, self._client.get_object, Bucket=self.bucket, Key=self._key(key))
        return self._call(key, response["Body"].read)

    def put_bytes(self, key: str, data: bytes | memoryview, progress: Progress | None = None) -> None:
        size = memoryview(data).nbytes
        if size >= self._transfer.multipart_threshold:
            self._call(key, self._client.upload_fileobj, _MemoryReader(data), self.bucket, self._key(key),
                       Config=self._transfer, Callback=progress)
            return
        self._call(key, self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=bytes(data))
        if progress:
            progress(size)

    def put_file(self, key: str, local_path: Path, progress: Progress | None = None) -> None:
        self._call(key, self._client.upload_file, str(local_path), self.bucket, self._key(key),
                   Config=self._transfer, Callback=progress)

    def get_file(self, key: str, local_path: Path, progress: Progress | None = None) -> None:
        target = Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            self._call(key, self._client.download_file, self.bucket, self._key(key), str(tmp),
                       Config=self._transfer, Callback=progress)
            os.replace(tmp, target)
        except OSError as error:
            raise _disk_error(error, str(target)) from None
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        found = []
        pages = self._call(prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full)))
        for page in pages:
            for obj in page.get("Contents", []):
                found.append(ObjectInfo(obj["Key"][strip:], int(obj["Size"]), obj["LastModified"].timestamp()))
        return sorted(found, key=lambda o: o.key)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            self._call(keys[start], self._client.delete_objects, Bucket=self.bucket,
                       Delete={"Objects": batch, "Quiet": True})

    def read_with_etag(self, key: str) -> tuple[bytes, str] | None:
        try:
            response = self._call(key, self._client.get_object, Bucket=self.bucket, Key=self._key(key))
        except NotFound:
            return None
        return self._call(key, response["Body"].read), response["ETag"]

    def put_if(self, key: str, data: bytes, etag: str | None) -> str:
        """Conditional PUT. A 412 is a lost race unless S3 holds exactly our bytes: our own write
        landed on an earlier attempt whose response was lost (botocore's retry, or ours after a
        409), and we won. Bodies are unique (pointers and manifests carry writer id and time), so
        another writer's object never has the same bytes. A 409 ConditionalRequestConflict (a
        concurrent conditional write in progress) is retried a few times with backoff."""
        condition = {"IfNoneMatch": "*"} if etag is None else {"IfMatch": etag}
        for attempt in range(_CONFLICT_RETRIES):
            try:
                response = self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
                return response["ETag"]
            except Exception as error:
                code, status = _client_error_code(error)
                if code == "PreconditionFailed" or status == 412:
                    current = self.read_with_etag(key)
                    if current is not None and current[0] == bytes(data):
                        return current[1]
                    raise FencedError(
                        f"{self.describe(key)} was changed by another writer: this writer stops"
                    ) from None
                if code == "ConditionalRequestConflict" or status == 409:
                    if attempt + 1 < _CONFLICT_RETRIES:
                        time.sleep(0.1 * 2 ** attempt)
                    continue
                raise self._error(error, key) from None
        raise StoreError(f"{self.describe(key)}: conditional write kept conflicting (409) "
                         f"{_CONFLICT_RETRIES} times; try again")


def open_store(url: str | Path, region: str | None = None, profile: str | None = None) -> Store:
    """The store for a run URL: s3://bucket/prefix, file:///path, or a plain directory path."""
    text = str(url)
    if "://" not in text:
        return LocalStore(text)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreUrlError(f"store URL {text!r} names no bucket (expected s3://bucket/prefix)")
        return S3Store(parsed.netloc, parsed.path, region=region, profile=profile)
    raise StoreUrlError(f"store URL {text!r} has an unknown scheme {parsed.scheme!r} (use a directory or s3://)")
