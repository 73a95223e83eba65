"""The jobs store: each job's spec, state and lease, as small objects under one store URL.

Layout under the jobs store (MAMBA_JOBS_STORE, e.g. s3://bucket/jobs):
    <id>/spec.yaml     the resolved run config and what the job asks for (written once)
    <id>/state.json    queued | running | done | failed | cancelled, attempts, step (conditional writes)
    <id>/lease.json    who runs it until when (If-None-Match to take, If-Match to renew or release);
                       a job on N > 1 nodes has one lease per node slot: lease.json, lease-1.json, ...
    <id>/logs/run-NNN.log   each run's output, uploaded by the agent
    <id>/run/          the job's run (checkpoints, records), unless its config names an s3:// store

Every write of state.json or lease.json is conditional on the ETag read before it, through the
checkpoint store's `put_if`, so two writers never both win (docs/design.md, "Jobs and the fleet").
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import yaml

from mamba_training.checkpoint.store import Store, open_store
from mamba_training.errors import FencedError, StoreError, UsageError

STATES = ("queued", "running", "done", "failed", "cancelled")
RUNNABLE = ("queued", "running")
TERMINAL = ("done", "failed", "cancelled")

SPEC, STATE, LEASE = "spec.yaml", "state.json", "lease.json"


class JobNotFound(UsageError):
    """No job with that id in the jobs store."""


class LeaseLost(FencedError):
    """Another agent holds the job's lease now: this one must stop running it."""


@dataclass(frozen=True)
class JobState:
    """What `jobs list` shows and the controllers decide on. `attempts` counts the runs that were
    charged to the job: a run that ends preempted (exit 75) or loses its holder is not charged."""

    id: str
    name: str
    state: str = "queued"
    nodes: int = 1
    priority: int = 0
    max_attempts: int = 3
    attempts: int = 0
    runs: int = 0  # every start, charged or not
    preemptions: int = 0
    step: int | None = None
    cancel_requested: bool = False
    holder: str | None = None
    exit_codes: tuple[int, ...] = ()
    reason: str | None = None
    submitted_at: float = 0.0
    enqueued_at: float = 0.0
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["exit_codes"] = list(self.exit_codes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobState":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["exit_codes"] = tuple(known.get("exit_codes") or ())
        return cls(**known)


@dataclass(frozen=True)
class Lease:
    job: str
    holder: str
    expires_at: float  # wall-clock seconds since the epoch, by the holder's clock
    released: bool = False

    def free(self, now: float) -> bool:
        return self.released or self.expires_at <= now


@dataclass(frozen=True)
class JobSpec:
    id: str
    name: str
    nodes: int
    priority: int
    max_attempts: int
    run_store: str
    config: dict[str, Any] = field(default_factory=dict)


def new_job_id(now: float | None = None) -> str:
    """Sortable by submission time, unique without coordination."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now if now is not None else time.time()))
    return f"job-{stamp}-{secrets.token_hex(3)}"


class JobsStore:
    def __init__(self, url: str, store: Store | None = None) -> None:
        if not url:
            raise UsageError("no jobs store: pass --store or set MAMBA_JOBS_STORE (e.g. s3://bucket/jobs)")
        self.store = store or open_store(url)
        self.url = self.store.url

    # ------------------------------------------------------------------ spec
    def run_store_for(self, job_id: str) -> str:
        return self.store.describe(f"{job_id}/run")

    def create(self, spec: JobSpec, state: JobState) -> None:
        body = yaml.safe_dump(asdict(spec), sort_keys=False).encode()
        self.store.put_if(f"{spec.id}/{SPEC}", body, None)
        self.store.put_if(f"{spec.id}/{STATE}", _json(state.to_dict()), None)

    def remove(self, job_id: str) -> None:
        """Forget a job entirely (a submit whose message could not be sent)."""
        self.store.delete([f"{job_id}/{SPEC}", f"{job_id}/{STATE}"])

    def spec(self, job_id: str) -> JobSpec:
        found = self.store.read_with_etag(f"{job_id}/{SPEC}")
        if found is None:
            raise JobNotFound(f"job {job_id!r} not found in {self.url}")
        return JobSpec(**yaml.safe_load(found[0]))

    # ------------------------------------------------------------------ state
    def state(self, job_id: str) -> tuple[JobState, str]:
        found = self.store.read_with_etag(f"{job_id}/{STATE}")
        if found is None:
            raise JobNotFound(f"job {job_id!r} not found in {self.url}")
        try:
            return JobState.from_dict(json.loads(found[0])), found[1]
        except (ValueError, TypeError) as error:
            raise StoreError(f"{self.store.describe(job_id + '/' + STATE)} is corrupt: {error}") from None

    def update(self, job_id: str, change: Callable[[JobState], JobState | None], now: float | None = None,
               attempts: int = 10) -> JobState:
        """Apply `change` to the current state and write it conditionally; on a lost race, re-read
        and apply it again. `change` returns None to leave the state as it is."""
        for _ in range(attempts):
            current, etag = self.state(job_id)
            changed = change(current)
            if changed is None or changed == current:
                return current
            changed = replace(changed, updated_at=now if now is not None else time.time())
            try:
                self.store.put_if(f"{job_id}/{STATE}", _json(changed.to_dict()), etag)
                return changed
            except FencedError:
                continue
        raise StoreError(f"job {job_id}: state kept changing under us; try again")

    def ids(self) -> list[str]:
        return sorted({o.key.split("/")[0] for o in self.store.list() if o.key.endswith("/" + STATE)
                       and o.key.count("/") == 1})

    def all_states(self) -> list[JobState]:
        found = []
        for job_id in self.ids():
            try:
                found.append(self.state(job_id)[0])
            except JobNotFound:  # removed between the listing and the read
                continue
        return found

    # ------------------------------------------------------------------ lease
    @staticmethod
    def lease_key(job_id: str, slot: int = 0) -> str:
        return f"{job_id}/{LEASE}" if slot == 0 else f"{job_id}/lease-{slot}.json"

    def lease(self, job_id: str, slot: int = 0) -> tuple[Lease | None, str | None]:
        found = self.store.read_with_etag(self.lease_key(job_id, slot))
        if found is None:
            return None, None
        try:
            return Lease(**json.loads(found[0])), found[1]
        except (ValueError, TypeError):
            return None, found[1]  # unreadable: treated as free, replaced conditionally

    def claim(self, job_id: str, holder: str, seconds: float, now: float | None = None, slot: int = 0) -> str | None:
        """Take the job's lease (of one node slot) if it is free (absent, released or expired); its
        ETag, or None when someone else holds it or won the race for it."""
        now = time.time() if now is None else now
        current, etag = self.lease(job_id, slot)
        if current is not None and not current.free(now):
            return None
        try:
            return self.store.put_if(self.lease_key(job_id, slot), _json(asdict(Lease(job_id, holder, now + seconds))),
                                     etag)
        except FencedError:
            return None

    def claim_slot(self, job_id: str, nodes: int, holder: str, seconds: float,
                   now: float | None = None) -> tuple[int, str] | None:
        """The first free node slot of the job, taken: (slot, ETag), or None when all are held."""
        for slot in range(nodes):
            etag = self.claim(job_id, holder, seconds, now, slot)
            if etag is not None:
                return slot, etag
        return None

    def free_slots(self, job_id: str, nodes: int, now: float | None = None) -> list[int]:
        now = time.time() if now is None else now
        free = []
        for slot in range(nodes):
            lease, _ = self.lease(job_id, slot)
            if lease is None or lease.free(now):
                free.append(slot)
        return free

    def renew(self, job_id: str, holder: str, etag: str, seconds: float, now: float | None = None,
              slot: int = 0) -> str:
        now = time.time() if now is None else now
        try:
            return self.store.put_if(self.lease_key(job_id, slot), _json(asdict(Lease(job_id, holder, now + seconds))),
                                     etag)
        except FencedError:
            raise LeaseLost(f"job {job_id}: lease taken over by another agent; {holder} stops running it") from None

    def release(self, job_id: str, holder: str, etag: str, slot: int = 0) -> None:
        try:
            self.store.put_if(self.lease_key(job_id, slot), _json(asdict(Lease(job_id, holder, 0.0, released=True))),
                              etag)
        except FencedError:
            raise LeaseLost(f"job {job_id}: lease taken over by another agent before {holder} released it") from None

    # ------------------------------------------------------------------ logs
    def put_log(self, job_id: str, name: str, data: bytes) -> None:
        self.store.put_bytes(f"{job_id}/logs/{name}", data)

    def logs(self, job_id: str) -> list[tuple[str, bytes]]:
        self.state(job_id)  # JobNotFound for an unknown id
        return [(o.key.rsplit("/", 1)[1], self.store.get_bytes(o.key)) for o in self.store.list(f"{job_id}/logs/")]


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True).encode()


__all__ = ["JobState", "JobSpec", "JobsStore", "JobNotFound", "Lease", "LeaseLost", "STATES", "RUNNABLE",
           "TERMINAL", "new_job_id"]
