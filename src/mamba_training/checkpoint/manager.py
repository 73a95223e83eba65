"""The checkpoint engine: async save, commit protocol with fencing, retention, verified restore.

Protocol (docs/design.md "Checkpoint protocol", docs/checkpoints.md):
1. data files go to `checkpoints/step_<8 digits>/` under keys unique to this save
   (`state-<token>.safetensors`, `state-<token>.json`), so no two writers ever overwrite data;
2. `manifest.json` (sizes, sha256, step, tokens, world size, config hash, writer, time) is written
   last, create-only: a checkpoint without it does not exist for readers;
3. `latest.json` is replaced by a conditional write on the ETag this writer last saw, so a stale
   writer (a replaced instance still running) cannot move it: it gets FencedError and stops.
Readers verify every file against the manifest before deserializing anything, and fall back to
the newest verified checkpoint when `latest.json` is missing or bad. A writer that fell back
supersedes the unverifiable checkpoints it skipped when it reaches their steps: it replaces such a
manifest conditionally on the manifest's ETag and on `latest.json` still holding the ETag it read
(docs/design.md "Checkpoint protocol").
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from mamba_training.checkpoint import state as state_io
from mamba_training.checkpoint.protocol import (
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    CheckpointPolicy,
    CheckpointSummary,
    CommitInfo,
    ProgressFactory,
    RestoreInfo,
    apply_retention,
    default_writer_id,
    list_checkpoints,
    parse_pointer,
    read_latest,
    retention_plan,
    step_prefix,
    utc_now,
    verify_checkpoint,
    wait_for_prefetch,
)
from mamba_training.checkpoint.store import Store, open_store
from mamba_training.errors import CheckpointError, FencedError, StoreError

log = logging.getLogger(__name__)

# Buffer pre-allocation threads still touching pages. A daemon thread inside a torch op while the
# interpreter finalizes aborts the process (SIGABRT, and the exit code is lost), so at exit they
# are told to stop and joined: each checks between 64 MiB slices.
_PREWARMS: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()
_STOP_PREWARMS = threading.Event()


@atexit.register
def _stop_prewarms() -> None:
    _STOP_PREWARMS.set()
    for thread in list(_PREWARMS):
        thread.join()


def load_verified(manifest: dict[str, Any], paths: dict[str, Path],
                  where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a verified checkpoint into memory: safetensors + JSON, never pickle."""
    try:
        tree = json.loads(paths[manifest["tree"]].read_text())
        tensors = load_file(str(paths[manifest["tensors"]]))
    except Exception as error:  # verified bytes that still do not parse: written by something else
        raise CheckpointError(f"checkpoint {where} does not decode: {error}") from None
    return tree, tensors


# --------------------------------------------------------------------------- manager
@dataclass
class _Job:
    step: int
    tokens_seen: int
    snap: state_io.Snapshot
    shapes: dict[str, list[int]]
    started: float
    stall: float
    copy: float = 0.0


class CheckpointManager:
    """Saves and restores a dict of Stateful objects to one run store.

    Rank 0 writes; other ranks' save() returns at once (DDP replicates the full state).
    One save is in flight at a time: a save() while one is in flight waits for it.
    After a FencedError (another writer advanced latest.json) the manager never writes again.
    """

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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = open_store(store) if isinstance(store, (str, Path)) else store
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
        self.clock = clock  # for the every-minutes policy only; tests move it by hand
        self._last_save_time = clock()
        self._copied = threading.Event()  # the in-flight save has copied the state
        self._copied.set()
        self._settled = threading.Event()  # the in-flight save has committed or failed
        self._settled.set()
        self._held = 0.0  # seconds optimizer steps waited for the current snapshot copy
        self._hooks: dict[int, Any] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._buffer_lock = threading.Lock()  # the save thread and the buffer pre-allocation
        self._prewarm_hooks: list[Any] = []
        self._prewarm_started = False
        self._prewarm_thread: threading.Thread | None = None
        self._closed = False
        # Steps the last restore skipped because they fail verification, with the ETag their
        # manifest had then (None: no manifest): this writer may supersede exactly those.
        self._unverifiable: dict[int, str | None] = {}

    # ---- policy
    def should_save(self, step: int) -> bool:
        return self.policy.due(step, self.clock() - self._last_save_time)

    @property
    def last_commit(self) -> CommitInfo | None:
        return self._last_commit

    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- save
    def save(self, step: int, tokens_seen: int, app_state: dict[str, Any]) -> None:
        """Snapshot now; write and commit in the background (or before returning if not async).

        Blocks while small state is copied; model and optimizer tensors are copied by the save
        thread, and the optimizers' next step() waits for that copy (a step pre-hook). Anything
        else that changes parameters in place must call `wait_snapshot()` first.
        """
        self._raise_failures()
        self._last_save_time = self.clock()
        if self.rank != 0:
            return
        self._wait()
        self._raise_failures()
        if self._last_commit is not None and self._last_commit.step == step:
            return  # already committed (e.g. the emergency save right after a periodic one)
        started = time.monotonic()
        defer = self.async_save and bool(state_io.optimizers(app_state))
        snap = state_io.snapshot(app_state, defer_large=defer)
        if defer:
            self._guard(app_state)
        shapes = state_io.snapshot_model_shapes(snap, app_state)
        job = _Job(step, tokens_seen, snap, shapes, started, time.monotonic() - started)
        self._settled.clear()
        if self.async_save:
            self._thread = threading.Thread(target=self._run_job, args=(job,), name=f"checkpoint-{step}", daemon=True)
            self._thread.start()
        else:
            self._run_job(job)
            self._raise_failures()

    def wait_snapshot(self) -> None:
        """Block until the in-flight save has copied the model and optimizer state."""
        if not self._copied.is_set():
            start = time.monotonic()
            self._copied.wait()
            self._held += time.monotonic() - start

    def _guard(self, app_state: dict[str, Any]) -> None:
        self._copied.clear()
        self._held = 0.0
        for optim in state_io.optimizers(app_state):
            if id(optim) not in self._hooks:
                self._hooks[id(optim)] = optim.register_step_pre_hook(lambda *_: self.wait_snapshot())

    def flush(self, timeout: float | None = None) -> CommitInfo | None:
        """Wait until the in-flight save is committed (or failed); return the newest commit.

        Raises what a background save hit. Retention may still be running afterwards: it is
        housekeeping that the next save(), restore() or close() waits for.
        """
        if not self._settled.wait(timeout):
            raise CheckpointError(f"checkpoint save still running after {timeout:.0f}s")
        self._raise_failures()
        return self._last_commit

    def settle(self, timeout: float | None = None) -> None:
        """Wait until the in-flight save has finished everything, retention included (`flush()`
        returns at the commit, while retention may still be deleting): for callers that change
        the store themselves next."""
        self._wait(timeout)

    def close(self) -> None:
        """Wait for the in-flight save and detach from the optimizers; failures are left to flush()."""
        try:
            self._wait()
        except CheckpointError:
            pass
        self._closed = True
        if self._prewarm_thread is not None:
            self._prewarm_thread.join()
        for handle in [*self._hooks.values(), *self._prewarm_hooks]:
            handle.remove()
        self._hooks.clear()
        self._prewarm_hooks.clear()
        with self._buffer_lock:
            self._buffers.clear()

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

    def _run_job(self, job: _Job) -> None:
        try:
            copy_start = time.monotonic()
            try:
                with self._buffer_lock:
                    reuse = self._buffers.get("tensors")
                    data = job.snap.serialize(reuse)
                    if reuse is None or data.data_ptr() != reuse.data_ptr():
                        self._buffers["tensors"] = data
            finally:
                self._copied.set()  # never leave an optimizer waiting, even when the copy failed
            job.copy = time.monotonic() - copy_start
            commit = self._write_and_commit(job, memoryview(data.numpy()))
            self._last_commit = commit
            log.info("checkpoint step %d committed in %.2fs (%d bytes, training blocked %.3fs)",
                     job.step, commit.seconds, commit.bytes, commit.stall_seconds)
        except FencedError as error:
            log.error("%s", error)
            self._fenced = error
        except BaseException as error:  # reported to the training loop at its next save/flush
            log.error("checkpoint step %d failed: %s", job.step, error)
            self._error = error if isinstance(error, (StoreError, CheckpointError)) else \
                CheckpointError(f"checkpoint step {job.step} failed: {type(error).__name__}: {error}")
        finally:
            self._settled.set()
        if self._last_commit is not None and self._last_commit.step == job.step and self._fenced is None:
            self._apply_retention(job.step)

    def _write_and_commit(self, job: _Job, tensors: memoryview) -> CommitInfo:
        """Upload the data (hashing it alongside), then the manifest, then move latest.json."""
        prefix = step_prefix(job.step)
        token = uuid.uuid4().hex[:12]
        tree = json.dumps(job.snap.tree).encode()
        blobs = {f"state-{token}.safetensors": tensors, f"state-{token}.json": memoryview(tree)}
        digests: dict[str, str] = {}
        hasher = threading.Thread(target=lambda: digests.update(
            {name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()}), daemon=True)
        hasher.start()  # hashlib releases the GIL: the hash costs no time next to the upload
        try:
            for name, blob in blobs.items():
                advance = self.progress(f"upload {name}", blob.nbytes) if self.progress else None
                self.store.put_bytes(f"{prefix}/{name}", blob, progress=advance)
        finally:
            hasher.join()
        names = list(blobs)
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": job.step,
            "tokens_seen": job.tokens_seen,
            "world_size": self.world_size,
            "config_hash": self.config_hash,
            "writer_id": self.writer_id,
            "time": utc_now(),
            "tensors": names[0],
            "tree": names[1],
            "files": {name: {"size": blob.nbytes, "sha256": digests[name]} for name, blob in blobs.items()},
            "model_shapes": job.shapes,
            "config": self.config,
        }
        manifest_bytes = json.dumps(manifest, indent=1).encode()
        self._check_not_fenced()
        self._write_manifest(job.step, manifest_bytes)
        self._advance_latest(job.step, manifest_bytes)
        total = sum(blob.nbytes for blob in blobs.values()) + len(manifest_bytes)
        return CommitInfo(job.step, job.tokens_seen, prefix, total, time.monotonic() - job.started,
                          job.stall + self._held, job.copy)

    def _check_not_fenced(self) -> None:
        """Fail before writing a manifest when latest.json moved since this writer last saw it."""
        current = self.store.read_with_etag(LATEST)
        etag = current[1] if current else None
        if not self._etag_known:
            self._etag, self._etag_known = etag, True
        elif etag != self._etag:
            pointer = parse_pointer(current[0]) if current else None
            who = f"step {pointer['step']} by {pointer.get('writer_id', '?')}" if pointer else "another writer"
            raise FencedError(f"{self.store.describe(LATEST)} was advanced to {who}: this writer stops")

    def _write_manifest(self, step: int, data: bytes) -> None:
        key = f"{step_prefix(step)}/{MANIFEST}"
        try:
            self.store.put_if(key, data, None)
            self._unverifiable.pop(step, None)
            return
        except FencedError:
            pass
        # A manifest is already there. If latest.json has reached this step, someone committed it:
        # this writer is stale, unless the checkpoint is one this writer's restore found
        # unverifiable and latest.json is still the one it read then (nobody wrote since): then it
        # supersedes it, conditionally on the manifest it saw, so of two writers doing this only
        # one wins. Otherwise the manifest was left by a writer that died before committing.
        current = self.store.read_with_etag(LATEST)
        pointer = parse_pointer(current[0]) if current else None
        if pointer is not None and pointer["step"] >= step:
            if step in self._unverifiable and current is not None and current[1] == self._etag:
                self.store.put_if(key, data, self._unverifiable.pop(step))
                log.info("checkpoint step %d supersedes the one there before, which does not verify", step)
                return
            raise FencedError(f"{self.store.describe(key)} was already committed by "
                              f"{pointer.get('writer_id', 'another writer')}: this writer stops")
        existing = self.store.read_with_etag(key)
        self.store.put_if(key, data, existing[1] if existing else None)
        self._unverifiable.pop(step, None)

    def _advance_latest(self, step: int, manifest_bytes: bytes) -> None:
        pointer = {
            "step": step,
            "path": step_prefix(step),
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "writer_id": self.writer_id,
            "time": utc_now(),
        }
        self._etag = self.store.put_if(LATEST, json.dumps(pointer).encode(), self._etag)

    def _apply_retention(self, newest: int) -> None:
        """Keep the last K committed plus every M-th; drop incomplete ones older than the newest.

        Inside the checkpoints kept, files the manifest does not name (left by a writer that died
        mid-save) are removed too.
        """
        try:
            plan = retention_plan(self.store, self.policy.keep_last, self.policy.keep_every, newest,
                                  unverifiable=set(self._unverifiable))
            apply_retention(self.store, plan)
            if plan.steps:
                log.debug("retention removed checkpoints %s", plan.steps)
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

        A checkpoint whose files fail verification is skipped with a warning for the next older
        one (an explicit `step` raises instead). Every file is verified and every tensor shape
        checked before any object is touched: a failure never leaves a half-restored model.
        A checkpoint of another model shape raises CheckpointError naming the tensor.
        """
        self._wait()
        started = time.monotonic()
        wait_for_prefetch(self.cache_dir)  # the CLI may have started the download before importing torch
        found = self.store.read_with_etag(LATEST)
        self._etag, self._etag_known = (found[1] if found else None), True
        self._unverifiable = {}
        pointer = parse_pointer(found[0]) if found else None
        reasons: list[str] = []  # why newer checkpoints were passed over: said once, in one line
        candidates = [step] if step is not None else self._candidates(pointer, found is not None, reasons)
        if not candidates:
            self._prewarm_after_next_step(app_state)
            return None
        for candidate in candidates:
            where = self.store.describe(step_prefix(candidate))
            try:
                manifest, paths = verify_checkpoint(self.store, candidate, self.cache_dir, self.progress)
            except CheckpointError as error:
                if step is not None:
                    raise
                reasons.append(f"step {candidate} skipped: {error}")
                seen = self.store.read_with_etag(f"{step_prefix(candidate)}/{MANIFEST}")
                self._unverifiable[candidate] = seen[1] if seen else None
                continue
            if pointer is not None and pointer["step"] == candidate and pointer.get("manifest_sha256") not in (
                    None, manifest["sha256"]):
                log.warning("the manifest of %s was replaced after it was committed (two writers saved step %d "
                            "at once); restoring the replacement, which verifies", where, candidate)
            state_io.check_shapes(manifest.get("model_shapes", {}), state_io.model_shapes(app_state), where)
            tree, tensors = load_verified(manifest, paths, where)
            state_io.apply(app_state, tree, tensors, where)
            info = RestoreInfo(candidate, int(manifest.get("tokens_seen", 0)), step_prefix(candidate),
                               int(manifest.get("world_size", 1)), time.monotonic() - started,
                               str(manifest.get("writer_id", "")))
            self._last_commit = CommitInfo(candidate, info.tokens_seen, info.path, 0, 0.0, 0.0)
            if reasons:
                log.warning("restored checkpoint %s, the newest that verifies: %s", where, "; ".join(reasons))
            else:
                log.info("restored checkpoint %s (written by %s with world size %d)", where,
                         info.writer_id, info.world_size)
            self._prewarm_after_next_step(app_state)
            return info
        raise CheckpointError(f"no checkpoint in {self.store.url} passes verification: {'; '.join(reasons)}")

    # ---- the serialization buffer, allocated ahead
    def _prewarm_after_next_step(self, app_state: dict[str, Any]) -> None:
        """After the next optimizer step (when AdamW's moments exist), allocate the save buffer and
        fault its pages in, in the background.

        A fresh buffer of several GB costs seconds of page faults (pinned allocation more), which
        the first save's copy would pay while the optimizer step waits for it: on every new spot
        instance. Done here, it overlaps the training steps before the first checkpoint.
        """
        if self.rank != 0 or not self.async_save or self._prewarm_hooks or self._prewarm_started:
            return

        def after_step(*_: Any) -> None:
            if not self._prewarm_started:  # hooks cannot be removed while step() iterates them
                self._prewarm_started = True
                self._prewarm_thread = threading.Thread(target=self._prewarm, args=(app_state,),
                                                        name="checkpoint-prewarm", daemon=True)
                _PREWARMS.add(self._prewarm_thread)
                self._prewarm_thread.start()

        self._prewarm_hooks = [optim.register_step_post_hook(after_step) for optim in state_io.optimizers(app_state)]

    def _prewarm(self, app_state: dict[str, Any]) -> None:
        try:
            with self._buffer_lock:
                if "tensors" in self._buffers:
                    return
                size = state_io.estimate_bytes(app_state)
                model = state_io.find_model(app_state)
                pinned = model is not None and any(p.is_cuda for p in model.parameters())
                buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pinned)
                for start in range(0, size, 64 << 20):  # touch every page, in slices: no long GIL-free burst
                    if _STOP_PREWARMS.is_set() or self._closed:
                        return
                    buffer[start:start + (64 << 20)].fill_(0)
                self._buffers["tensors"] = buffer
            log.debug("checkpoint buffer of %d bytes allocated ahead of the first save", size)
        except Exception as error:  # an optimisation only: the save allocates its own buffer
            log.warning("could not allocate the checkpoint buffer ahead: %s", error)

    def _candidates(self, pointer: dict[str, Any] | None, pointer_exists: bool, reasons: list[str]) -> list[int]:
        """Steps to try, newest first: the one latest.json names and those before it (else every
        committed one); why latest.json could not be followed goes into `reasons`."""
        committed = [s.step for s in list_checkpoints(self.store) if s.committed]
        if pointer is not None and pointer["step"] in committed:
            return [pointer["step"]] + [s for s in committed if s < pointer["step"]]
        if committed:
            state = "is missing" if not pointer_exists else "is unreadable" if pointer is None else \
                f"names step {pointer['step']}, which has no readable manifest"
            reasons.append(f"{self.store.describe(LATEST)} {state}")
        if pointer is not None and pointer["step"] not in committed:
            # A step this writer may commit over when it gets there (its manifest, if any, is bad).
            seen = self.store.read_with_etag(f"{step_prefix(pointer['step'])}/{MANIFEST}")
            self._unverifiable[pointer["step"]] = seen[1] if seen else None
        return committed

    # ---- the run's other files
    def upload_run_file(self, key: str, local_path: str | Path) -> None:
        """Upload one of the run's other files (config, final weights, records) on rank 0."""
        if self.rank == 0:
            path = Path(local_path)
            advance = self.progress(f"upload {key}", path.stat().st_size) if self.progress else None
            self.store.put_file(key, path, progress=advance)

    def upload_dir(self, local_dir: str | Path, prefix: str) -> None:
        """Upload every file under `local_dir` to `prefix/` (rank 0 only), several at once: the run's
        records go up on the stop path, where each round trip counts."""
        if self.rank != 0:
            return
        base = Path(local_dir)
        files = [path for path in sorted(base.rglob("*")) if path.is_file()]
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(files))), thread_name_prefix="upload") as pool:
            futures = [pool.submit(self.upload_run_file, f"{prefix.rstrip('/')}/{path.relative_to(base).as_posix()}",
                                   path) for path in files]
            for future in futures:
                future.result()
