"""The checkpoint engine: async save, commit protocol with fencing, retention, verified restore.

Protocol (DESIGN.md "Checkpoint protocol"):
1. data files go to `checkpoints/step_<8 digits>/` under unique keys;
2. `manifest.json` (sizes, sha256, step, tokens, world size, config hash, writer, time) is written
   last: a checkpoint without it does not exist for readers;
3. `latest.json` is replaced by a conditional write on the ETag this writer last saw, so a stale
   writer (a replaced instance still running) cannot move it: it gets FencedError and stops.
Readers verify every file against the manifest before deserializing anything, and fall back to
the newest verified checkpoint when `latest.json` is missing or bad.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from mamba_training.checkpoint import state as state_io
from mamba_training.checkpoint.store import NotFound, Store, open_store, sha256_file
from mamba_training.errors import CheckpointError, FencedError, StoreError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST = "latest.json"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TENSORS_FILE = "state.safetensors"
TREE_FILE = "state.json"
_STEP_DIR = re.compile(r"^checkpoints/step_(\d{8})/")

ProgressFactory = Callable[[str, int], Callable[[int], None]]  # (description, total bytes) -> advance


def step_prefix(step: int) -> str:
    return f"{CHECKPOINTS}/step_{step:08d}"


@dataclass(frozen=True)
class CheckpointPolicy:
    every_steps: int = 100
    every_minutes: float | None = None
    keep_last: int = 3
    keep_every: int = 0


@dataclass(frozen=True)
class CommitInfo:
    step: int
    tokens_seen: int
    path: str
    bytes: int
    seconds: float  # from the start of the save (snapshot) to latest.json committed
    stall_seconds: float  # how long training was blocked by the snapshot


@dataclass(frozen=True)
class RestoreInfo:
    step: int
    tokens_seen: int
    path: str
    world_size: int
    seconds: float
    writer_id: str


@dataclass(frozen=True)
class CheckpointSummary:
    step: int
    path: str
    committed: bool  # has a manifest
    latest: bool
    bytes: int
    manifest: dict[str, Any] | None


def default_writer_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------- reading
def list_checkpoints(store: Store) -> list[CheckpointSummary]:
    """Every checkpoint folder in the store, newest first, with its manifest when committed."""
    sizes: dict[int, int] = {}
    has_manifest: set[int] = set()
    for obj in store.list(CHECKPOINTS + "/"):
        match = _STEP_DIR.match(obj.key)
        if not match:
            continue
        step = int(match.group(1))
        sizes[step] = sizes.get(step, 0) + obj.size
        if obj.key.endswith("/" + MANIFEST):
            has_manifest.add(step)
    latest = read_latest(store)
    out = []
    for step in sorted(sizes, reverse=True):
        manifest = None
        if step in has_manifest:
            try:
                manifest = json.loads(store.get_bytes(f"{step_prefix(step)}/{MANIFEST}"))
            except (json.JSONDecodeError, NotFound, UnicodeDecodeError):
                manifest = None
        out.append(CheckpointSummary(step, step_prefix(step), manifest is not None,
                                     latest is not None and latest.get("step") == step, sizes[step], manifest))
    return out


def read_latest(store: Store) -> dict[str, Any] | None:
    found = store.read_with_etag(LATEST)
    if found is None:
        return None
    try:
        data = json.loads(found[0])
        int(data["step"])
        return data
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        return None


def verify_checkpoint(store: Store, step: int, cache_dir: Path | None = None,
                      progress: ProgressFactory | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Fetch a checkpoint's files (if remote) and check them against its manifest.

    Returns (manifest, {file name: local path}); raises CheckpointError naming the bad object.
    """
    prefix = step_prefix(step)
    where = store.describe(prefix)
    try:
        manifest = json.loads(store.get_bytes(f"{prefix}/{MANIFEST}"))
        files = manifest["files"]
        int(manifest["step"])
    except NotFound:
        raise CheckpointError(f"checkpoint {where} has no manifest: it was never committed") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint manifest {store.describe(prefix + '/' + MANIFEST)} is corrupt") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {where} has format {manifest.get('format_version')}, "
                              f"this version reads {FORMAT_VERSION}")
    paths: dict[str, Path] = {}
    for name, meta in files.items():
        key = f"{prefix}/{name}"
        local = store.local_path(key)
        if local is None:
            if cache_dir is None:
                raise CheckpointError(f"no cache folder to download {store.describe(key)} into")
            local = Path(cache_dir) / _cache_name(store) / prefix / name
            if not (local.is_file() and local.stat().st_size == meta["size"] and sha256_file(local) == meta["sha256"]):
                advance = progress(f"download {name}", int(meta["size"])) if progress else None
                store.get_file(key, local, progress=advance)
        if not local.is_file():
            raise CheckpointError(f"checkpoint file {store.describe(key)} is missing")
        size = local.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"checkpoint file {store.describe(key)} is {size} bytes, manifest says {meta['size']}")
        if sha256_file(local) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {store.describe(key)} fails its sha256 check")
        paths[name] = local
    return manifest, paths


def _cache_name(store: Store) -> str:
    return hashlib.sha256(store.url.encode()).hexdigest()[:16]


def load_verified(paths: dict[str, Path]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a verified checkpoint into memory: safetensors + JSON, never pickle."""
    tree = json.loads(paths[TREE_FILE].read_text())
    tensors = load_file(str(paths[TENSORS_FILE])) if TENSORS_FILE in paths else {}
    return tree, tensors


# --------------------------------------------------------------------------- manager
class CheckpointManager:
    def __init__(
        self,
        store: Store | str,
        *,
        policy: CheckpointPolicy = CheckpointPolicy(),
        config: dict[str, Any] | None = None,
        config_hash: str = "",
        cache_dir: str | Path = ".cache/mamba-training/checkpoints",
        writer_id: str | None = None,
        async_save: bool = True,
        rank: int = 0,
        world_size: int = 1,
        progress: ProgressFactory | None = None,
    ) -> None:
        self.store = open_store(store) if isinstance(store, str) else store
        self.policy = policy
        self.config = config or {}
        self.config_hash = config_hash
        self.cache_dir = Path(cache_dir)
        self.writer_id = writer_id or default_writer_id()
        self.async_save = async_save
        self.rank = rank
        self.world_size = world_size
        self.progress = progress
        self._etag: str | None = None
        self._etag_known = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._fenced: FencedError | None = None
        self._last_commit: CommitInfo | None = None
        self._last_save_time = time.monotonic()
        self._lock = threading.Lock()

    # ---- policy
    def should_save(self, step: int) -> bool:
        if self.policy.every_steps and step % self.policy.every_steps == 0:
            return True
        minutes = self.policy.every_minutes
        return bool(minutes) and time.monotonic() - self._last_save_time >= minutes * 60

    @property
    def last_commit(self) -> CommitInfo | None:
        return self._last_commit

    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- save
    def save(self, step: int, tokens_seen: int, app_state: dict[str, Any]) -> None:
        """Snapshot now (blocking), write and commit in the background (or now if not async)."""
        self._raise_failures()
        self._last_save_time = time.monotonic()
        if self.rank != 0:
            return
        self._wait()
        self._raise_failures()
        started = time.monotonic()
        tree, tensors = state_io.snapshot(app_state)
        shapes = state_io.model_shapes(app_state)
        stall = time.monotonic() - started
        job = (step, tokens_seen, tree, tensors, shapes, started, stall)
        if self.async_save:
            self._thread = threading.Thread(target=self._run_job, args=job, name=f"checkpoint-{step}", daemon=True)
            self._thread.start()
        else:
            self._run_job(*job)
            self._raise_failures()

    def flush(self, timeout: float | None = None) -> CommitInfo | None:
        """Wait for the in-flight save; return the newest commit. Raises what a background save hit."""
        self._wait(timeout)
        self._raise_failures()
        return self._last_commit

    def close(self) -> None:
        try:
            self._wait()
        except Exception:  # close is best effort; flush() is how callers learn about failures
            pass

    def _wait(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise CheckpointError(f"checkpoint save still running after {timeout:.0f}s")
            self._thread = None

    def _raise_failures(self) -> None:
        if self._fenced is not None:
            raise self._fenced
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run_job(self, step, tokens_seen, tree, tensors, shapes, started, stall) -> None:
        try:
            commit = self._write_and_commit(step, tokens_seen, tree, tensors, shapes, started, stall)
            with self._lock:
                self._last_commit = commit
            log.info("checkpoint step %d committed in %.2fs (%d bytes)", step, commit.seconds, commit.bytes)
            self._apply_retention(step)
        except FencedError as error:
            log.error("%s", error)
            self._fenced = error
        except BaseException as error:  # reported to the training loop at its next save/flush
            log.error("checkpoint step %d failed: %s", step, error)
            self._error = error if isinstance(error, (StoreError, CheckpointError)) else \
                CheckpointError(f"checkpoint step {step} failed: {error}")

    def _write_and_commit(self, step, tokens_seen, tree, tensors, shapes, started, stall) -> CommitInfo:
        prefix = step_prefix(step)
        staging = self.cache_dir / "staging" / f"{_cache_name(self.store)}-{step:08d}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(staging / TENSORS_FILE))
            (staging / TREE_FILE).write_text(json.dumps(tree))
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise StoreError(f"cannot stage checkpoint step {step} in {staging}: {error.strerror or error}") from None
        files = {}
        total = 0
        try:
            for name in (TENSORS_FILE, TREE_FILE):
                path = staging / name
                size = path.stat().st_size
                files[name] = {"size": size, "sha256": sha256_file(path)}
                total += size
                advance = self.progress(f"upload {name}", size) if self.progress else None
                self.store.put_file(f"{prefix}/{name}", path, progress=advance)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "tokens_seen": tokens_seen,
            "world_size": self.world_size,
            "config_hash": self.config_hash,
            "writer_id": self.writer_id,
            "time": _utc(),
            "files": files,
            "model_shapes": shapes,
            "config": self.config,
        }
        manifest_bytes = json.dumps(manifest, indent=1).encode()
        self.store.put_bytes(f"{prefix}/{MANIFEST}", manifest_bytes)
        self._advance_latest(step, manifest_bytes)
        return CommitInfo(step, tokens_seen, prefix, total + len(manifest_bytes), time.monotonic() - started, stall)

    def _advance_latest(self, step: int, manifest_bytes: bytes) -> None:
        if not self._etag_known:
            current = self.store.read_with_etag(LATEST)
            self._etag = current[1] if current else None
            self._etag_known = True
        pointer = {
            "step": step,
            "path": step_prefix(step),
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "writer_id": self.writer_id,
            "time": _utc(),
        }
        self._etag = self.store.put_if(LATEST, json.dumps(pointer).encode(), self._etag)

    def _apply_retention(self, newest: int) -> None:
        """Keep the last K committed plus every M-th; drop incomplete ones older than the newest."""
        try:
            summaries = list_checkpoints(self.store)
            committed = [s.step for s in summaries if s.committed]
            keep = set(sorted(committed, reverse=True)[: self.policy.keep_last]) | {newest}
            if self.policy.keep_every:
                keep |= {s for s in committed if s % self.policy.keep_every == 0}
            doomed = [s.step for s in summaries if s.step not in keep and (s.committed or s.step < newest)]
            if not doomed:
                return
            keys = [o.key for o in self.store.list(CHECKPOINTS + "/")
                    if (m := _STEP_DIR.match(o.key)) and int(m.group(1)) in doomed]
            # Remove manifests first so a half-deleted checkpoint is never mistaken for a committed one.
            keys.sort(key=lambda k: not k.endswith(MANIFEST))
            self.store.delete(keys)
            log.debug("retention removed checkpoints %s", sorted(doomed))
        except Exception as error:  # retention is housekeeping: never fail a commit over it
            log.warning("checkpoint retention failed: %s", error)

    # ---- restore
    def latest(self) -> CheckpointSummary | None:
        """The checkpoint a restore would start from (without verifying its files)."""
        pointer = read_latest(self.store)
        summaries = [s for s in list_checkpoints(self.store) if s.committed]
        if pointer is not None:
            for s in summaries:
                if s.step == pointer["step"]:
                    return s
        return summaries[0] if summaries else None

    def restore(self, app_state: dict[str, Any], step: int | None = None) -> RestoreInfo | None:
        """Restore the newest verified checkpoint (or `step`) into `app_state`; None if there is none.

        Every file is verified and every tensor shape checked before any object is touched, so a
        failure never leaves a half-restored model.
        """
        started = time.monotonic()
        found = self.store.read_with_etag(LATEST)
        self._etag, self._etag_known = (found[1] if found else None), True
        candidates = self._candidates(step)
        if not candidates:
            return None
        for candidate in candidates:
            try:
                manifest, paths = verify_checkpoint(self.store, candidate, self.cache_dir, self.progress)
            except CheckpointError as error:
                if step is not None:
                    raise
                log.warning("skipping checkpoint step %d: %s", candidate, error)
                continue
            where = self.store.describe(step_prefix(candidate))
            state_io.check_shapes(manifest.get("model_shapes", {}), state_io.model_shapes(app_state), where)
            tree, tensors = load_verified(paths)
            state_io.apply(app_state, tree, tensors)
            info = RestoreInfo(candidate, int(manifest.get("tokens_seen", 0)), step_prefix(candidate),
                               int(manifest.get("world_size", 1)), time.monotonic() - started,
                               str(manifest.get("writer_id", "")))
            self._last_commit = CommitInfo(candidate, info.tokens_seen, info.path, 0, 0.0, 0.0)
            log.info("restored checkpoint %s (written by %s with world size %d)", where,
                     info.writer_id, info.world_size)
            return info
        raise CheckpointError(f"no checkpoint in {self.store.url} passes verification")

    def _candidates(self, step: int | None) -> list[int]:
        if step is not None:
            return [step]
        committed = [s.step for s in list_checkpoints(self.store) if s.committed]
        pointer = read_latest(self.store)
        if pointer is not None and pointer["step"] in committed:
            newer_first = [pointer["step"]] + [s for s in committed if s < pointer["step"]]
            return newer_first
        if pointer is not None or committed:
            log.warning("latest.json in %s is %s: falling back to the newest verified manifest",
                        self.store.url, "bad" if pointer is not None else "missing")
        return committed

    # ---- the run's other files
    def upload_run_file(self, key: str, local_path: str | Path) -> None:
        if self.rank == 0:
            self.store.put_file(key, Path(local_path))

    def upload_dir(self, local_dir: str | Path, prefix: str) -> None:
        if self.rank != 0:
            return
        base = Path(local_dir)
        for path in sorted(base.rglob("*")):
            if path.is_file():
                self.store.put_file(f"{prefix.rstrip('/')}/{path.relative_to(base).as_posix()}", path)
