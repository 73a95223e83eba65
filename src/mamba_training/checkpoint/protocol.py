"""The checkpoint protocol on a store, without torch: names, manifests, `latest.json`, verification,
listing, retention plans, and copying whole checkpoints between a store and a local folder.

Layout of a run (docs/checkpoints.md):
    latest.json                                  {"step", "path", "manifest_sha256", "writer_id", "time"}
    checkpoints/step_<8 digits>/state-<token>.safetensors   tensors (safetensors: no pickle)
    checkpoints/step_<8 digits>/state-<token>.json          everything else, tensors by reference
    checkpoints/step_<8 digits>/manifest.json              written last: files with size + sha256, ...
The CLI and the run-records reader use this module; only the manager (saving, restoring) needs torch.
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
from typing import Any, Callable, Collection

from mamba_training.checkpoint.store import NotFound, Store, sha256_file
from mamba_training.errors import CheckpointError, FencedError, StoreError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST = "latest.json"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^checkpoints/step_(\d{8})/")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # manifest file names: no paths, no '..'

# progress(description, total_bytes) -> advance(bytes_just_done); the CLI passes rich bars in.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


def step_prefix(step: int) -> str:
    return f"{CHECKPOINTS}/step_{step:08d}"


@dataclass(frozen=True)
class CheckpointPolicy:
    every_steps: int = 100
    every_minutes: float | None = None
    keep_last: int = 3
    keep_every: int = 0

    def due(self, step: int, seconds_since_save: float) -> bool:
        """Whether a checkpoint is due at `step`, `seconds_since_save` after the last save began."""
        if self.every_steps and step % self.every_steps == 0:
            return True
        return bool(self.every_minutes) and seconds_since_save >= self.every_minutes * 60


@dataclass(frozen=True)
class CommitInfo:
    step: int
    tokens_seen: int
    path: str
    bytes: int
    seconds: float  # from the start of save() to latest.json committed
    stall_seconds: float  # how long training was blocked: snapshot + optimizer step held for the copy
    copy_seconds: float = 0.0  # the background copy into the serialization buffer (the most a step can wait)


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
    committed: bool  # has a manifest that parses
    latest: bool
    bytes: int
    manifest: dict[str, Any] | None


def default_writer_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def cache_name(store: Store) -> str:
    return hashlib.sha256(store.url.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- reading
def read_latest(store: Store) -> dict[str, Any] | None:
    """The parsed `latest.json`, or None when it is missing or unreadable."""
    found = store.read_with_etag(LATEST)
    return parse_pointer(found[0]) if found else None


def parse_pointer(data: bytes) -> dict[str, Any] | None:
    try:
        pointer = json.loads(data)
        pointer["step"] = int(pointer["step"])
        return pointer
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        return None


def list_checkpoints(store: Store) -> list[CheckpointSummary]:
    """Every checkpoint folder in the store, newest first, with its manifest when committed."""
    sizes: dict[int, int] = {}
    has_manifest: set[int] = set()
    for obj in store.list(CHECKPOINTS + "/"):
        match = STEP_DIR.match(obj.key)
        if not match:
            continue
        step = int(match.group(1))
        sizes[step] = sizes.get(step, 0) + obj.size
        if obj.key == f"{step_prefix(step)}/{MANIFEST}":
            has_manifest.add(step)
    latest = read_latest(store)
    out = []
    for step in sorted(sizes, reverse=True):
        manifest = None
        if step in has_manifest:
            try:
                manifest = parse_manifest(store.get_bytes(f"{step_prefix(step)}/{MANIFEST}"), store, step)
            except (CheckpointError, NotFound):
                manifest = None
        out.append(CheckpointSummary(step, step_prefix(step), manifest is not None,
                                     latest is not None and latest["step"] == step, sizes[step], manifest))
    return out


def parse_manifest(data: bytes, store: Store, step: int) -> dict[str, Any]:
    where = store.describe(f"{step_prefix(step)}/{MANIFEST}")
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        names = [manifest["tensors"], manifest["tree"]]
        if int(manifest["step"]) != step:
            raise CheckpointError(f"checkpoint manifest {where} is for step {manifest['step']}, not {step}")
        for name, meta in files.items():
            int(meta["size"]), str(meta["sha256"])
            if not _FILE_NAME.match(name):
                raise CheckpointError(f"checkpoint manifest {where} names a bad file {name!r}")
        if any(name not in files for name in names):
            raise CheckpointError(f"checkpoint manifest {where} does not list its state files")
    except CheckpointError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint manifest {where} is corrupt") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {where} has format {manifest.get('format_version')}, "
                              f"this version reads {FORMAT_VERSION}")
    return manifest


def verify_checkpoint(store: Store, step: int, cache_dir: str | Path | None = None,
                      progress: ProgressFactory | None = None) -> tuple[dict[str, Any], dict[str, Path]]:
    """Fetch a checkpoint's files (if remote) and check each one's size and sha256 against the manifest.

    Returns (manifest, {file name: local path}); raises CheckpointError naming the bad object.
    Nothing is deserialized here: this is what stands between the store and safetensors/JSON.
    """
    prefix = step_prefix(step)
    try:
        raw = store.get_bytes(f"{prefix}/{MANIFEST}")
        manifest = parse_manifest(raw, store, step)
        manifest["sha256"] = hashlib.sha256(raw).hexdigest()
    except NotFound:
        raise CheckpointError(f"checkpoint {store.describe(prefix)} has no manifest: it was never committed") from None
    paths: dict[str, Path] = {}
    for name, meta in manifest["files"].items():
        key = f"{prefix}/{name}"
        size, digest = int(meta["size"]), str(meta["sha256"])
        local = store.local_path(key)
        if local is None:
            if cache_dir is None:
                raise CheckpointError(f"no cache folder to download {store.describe(key)} into")
            local = Path(cache_dir) / cache_name(store) / prefix / name
            if not (local.is_file() and local.stat().st_size == size and _sha256(local) == digest):
                advance = progress(f"download {name}", size) if progress else None
                try:
                    store.get_file(key, local, progress=advance)
                except NotFound:
                    raise CheckpointError(f"checkpoint file {store.describe(key)} is missing") from None
        if not local.is_file():
            raise CheckpointError(f"checkpoint file {store.describe(key)} is missing")
        actual = local.stat().st_size
        if actual != size:
            raise CheckpointError(f"checkpoint file {store.describe(key)} is {actual} bytes, manifest says {size}")
        if _sha256(local) != digest:
            raise CheckpointError(f"checkpoint file {store.describe(key)} fails its sha256 check")
        paths[name] = local
    return manifest, paths


# Digests this process computed, by path, valid while the file's size and mtime stay the same:
# a restore after a prefetch (below) does not hash gigabytes twice.
_digests: dict[Path, tuple[int, int, str]] = {}
_digests_lock = threading.Lock()


def _sha256(path: Path) -> str:
    stat = path.stat()
    with _digests_lock:
        known = _digests.get(path)
    if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
        return known[2]
    digest = sha256_file(path)
    with _digests_lock:
        _digests[path] = (stat.st_size, stat.st_mtime_ns, digest)
    return digest


# --------------------------------------------------------------------------- prefetch
_prefetches: dict[str, threading.Thread] = {}


def prefetch_latest(store_url: str, cache_dir: str | Path, progress: ProgressFactory | None = None) -> None:
    """Start downloading and verifying the checkpoint latest.json names into `cache_dir`, in a
    background thread, before torch is even imported.

    A replacement spot instance spends seconds importing torch and building the model before it
    can restore; the S3 client set-up, the download and the sha256 (hashlib releases the GIL) run
    meanwhile. `CheckpointManager.restore` waits for it and finds the files in its cache. Best
    effort: whatever goes wrong here is left for the restore to find and report.
    """
    from mamba_training.checkpoint.store import open_store

    def work() -> None:
        try:
            store = open_store(store_url)
            if store.local_path(LATEST) is not None:
                return  # a local store is read in place
            pointer = read_latest(store)
            if pointer is not None:
                verify_checkpoint(store, pointer["step"], cache_dir, progress)
        except Exception as error:  # noqa: BLE001 - the restore reports it properly
            log.debug("prefetching the latest checkpoint of %s did not finish: %s", store_url, error)

    thread = threading.Thread(target=work, name="checkpoint-prefetch", daemon=True)
    _prefetches[str(Path(cache_dir).absolute())] = thread
    thread.start()


def wait_for_prefetch(cache_dir: str | Path | None) -> None:
    """Block until the prefetch into `cache_dir` (if one was started in this process) is done."""
    if cache_dir is None:
        return
    thread = _prefetches.pop(str(Path(cache_dir).absolute()), None)
    if thread is not None:
        thread.join()


# --------------------------------------------------------------------------- retention
@dataclass(frozen=True)
class RetentionPlan:
    steps: list[int]  # checkpoints removed entirely
    keys: list[str]  # every object to delete, manifests first


def retention_plan(store: Store, keep_last: int, keep_every: int = 0, newest: int | None = None,
                   unverifiable: Collection[int] = ()) -> RetentionPlan:
    """What to delete to keep the last K committed plus every M-th, counting only good checkpoints.

    `newest` (default: the step latest.json names, else the newest committed) is always kept.
    K and M count committed checkpoints up to `newest` that are not known to be bad: a bad one
    (in `unverifiable`, which the manager's restore found failing verification, or whose files the
    listing shows missing or of another size than its manifest says) never pushes a good one out.
    Bad ones older than `newest` are removed: the run has moved past them and they cannot restore.
    Committed checkpoints newer than `newest` are left alone (the writer replaces them when it
    gets there). Incomplete checkpoints (no manifest) are removed only when older than `newest`:
    a newer one may still be uploading. Inside checkpoints older than `newest`, files their
    manifest does not name (left by a writer that died mid-save, or superseded) are removed too.
    """
    summaries = list_checkpoints(store)
    committed = [s.step for s in summaries if s.committed]
    if newest is None:
        pointer = read_latest(store)
        newest = pointer["step"] if pointer else (committed[0] if committed else None)
    if newest is None:
        return RetentionPlan([], [])
    objects = store.list(CHECKPOINTS + "/")
    sizes = {obj.key: obj.size for obj in objects}
    manifests = {s.step: s.manifest for s in summaries if s.manifest is not None}
    bad = set(unverifiable) | {step for step, manifest in manifests.items() if any(
        sizes.get(f"{step_prefix(step)}/{name}") != int(meta["size"]) for name, meta in manifest["files"].items())}
    good = sorted((s for s in committed if s <= newest and s not in bad), reverse=True)
    keep = set(good[: max(1, keep_last)]) | {newest}
    if keep_every:
        keep |= {s for s in good if s % keep_every == 0}
    doomed = {s.step for s in summaries if s.step not in keep and s.step < newest}
    keys = []
    for obj in objects:
        match = STEP_DIR.match(obj.key)
        if not match:
            continue
        step, name = int(match.group(1)), obj.key.rsplit("/", 1)[-1]
        stray = step < newest and step in manifests and name != MANIFEST and name not in manifests[step]["files"]
        if step in doomed or stray:
            keys.append(obj.key)
    # Manifests go first so a half-deleted checkpoint is never mistaken for a committed one.
    keys.sort(key=lambda k: not k.endswith("/" + MANIFEST))
    return RetentionPlan(sorted(doomed), keys)


def apply_retention(store: Store, plan: RetentionPlan) -> None:
    if plan.keys:
        store.delete(plan.keys)


# --------------------------------------------------------------------------- copying whole checkpoints
def download_checkpoint(store: Store, step: int | None, dest: str | Path,
                        progress: ProgressFactory | None = None) -> dict[str, Any]:
    """Verify a checkpoint (default: the one latest.json names) into `dest`/, manifest included."""
    if step is None:
        step = latest_committed_step(store)
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        manifest, paths = verify_checkpoint(store, step, dest / ".download", progress)
        for name, path in paths.items():
            if store.local_path(f"{step_prefix(step)}/{name}") is not None:
                shutil.copyfile(path, dest / name)
            else:
                os.replace(path, dest / name)
        (dest / MANIFEST).write_bytes(store.get_bytes(f"{step_prefix(step)}/{MANIFEST}"))
    except OSError as error:  # the destination, not the store: name the local path
        raise StoreError(f"cannot write {error.filename or dest}: {error.strerror or error}") from None
    finally:
        shutil.rmtree(dest / ".download", ignore_errors=True)
    return manifest


def upload_checkpoint(store: Store, src: str | Path, progress: ProgressFactory | None = None,
                      set_latest: bool = True) -> int:
    """Copy a checkpoint folder (as `download_checkpoint` writes it) into a run with the commit protocol.

    Files are checked against the folder's manifest first; the manifest goes up last (create-only)
    and latest.json moves to it (conditional write) when it is newer than the current one.
    """
    src = Path(src)
    try:
        raw = (src / MANIFEST).read_bytes()
    except OSError:
        raise CheckpointError(f"{src} is not a checkpoint folder: it has no {MANIFEST}") from None
    step = _manifest_step(raw, src)
    manifest = parse_manifest(raw, store, step)
    for name, meta in manifest["files"].items():
        path = src / name
        if not path.is_file() or path.stat().st_size != int(meta["size"]) or sha256_file(path) != meta["sha256"]:
            raise CheckpointError(f"{path} is missing or does not match {src / MANIFEST}")
    prefix = step_prefix(step)
    # Checked first (and again by the create-only write): the copied manifest is not unique to this
    # upload, so a 412 on it could not tell a committed checkpoint from our own lost response.
    if store.exists(f"{prefix}/{MANIFEST}"):
        raise CheckpointError(f"{store.describe(prefix)} already holds a committed checkpoint")
    for name, meta in manifest["files"].items():
        advance = progress(f"upload {name}", int(meta["size"])) if progress else None
        store.put_file(f"{prefix}/{name}", src / name, progress=advance)
    try:
        store.put_if(f"{prefix}/{MANIFEST}", raw, None)
    except FencedError:
        raise CheckpointError(f"{store.describe(prefix)} already holds a committed checkpoint") from None
    current = store.read_with_etag(LATEST)
    pointer = parse_pointer(current[0]) if current else None
    if set_latest and (pointer is None or pointer["step"] < step):
        body = {"step": step, "path": prefix, "manifest_sha256": hashlib.sha256(raw).hexdigest(),
                "writer_id": f"upload-{default_writer_id()}", "time": utc_now()}
        store.put_if(LATEST, json.dumps(body).encode(), current[1] if current else None)
    return step


def _manifest_step(raw: bytes, src: Path) -> int:
    try:
        return int(json.loads(raw)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{src / MANIFEST} is corrupt") from None


def latest_committed_step(store: Store) -> int:
    """The step latest.json names if that checkpoint has a manifest, else the newest that has one."""
    pointer = read_latest(store)
    committed = [s.step for s in list_checkpoints(store) if s.committed]
    if pointer is not None and pointer["step"] in committed:
        return pointer["step"]
    if not committed:
        raise CheckpointError(f"{store.url} holds no committed checkpoint")
    return committed[0]
