"""What `submit` and `jobs list|show|cancel|logs` do: validate, write the jobs store, enqueue."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from mamba_training.aws.queue import Queue
from mamba_training.config import load_config
from mamba_training.errors import AwsError, UsageError
from mamba_training.fleet import policy
from mamba_training.fleet.jobs import JobSpec, JobState, JobsStore, new_job_id


@dataclass(frozen=True)
class Endpoints:
    queue_url: str | None
    store_url: str | None

    def jobs(self) -> JobsStore:
        if not self.store_url:
            raise UsageError("no jobs store: pass --store or set MAMBA_JOBS_STORE (e.g. s3://bucket/jobs)")
        return JobsStore(self.store_url)

    def queue(self) -> Queue:
        if not self.queue_url:
            raise UsageError("no queue: pass --queue or set MAMBA_QUEUE_URL")
        return Queue(self.queue_url)


def submit(where: Endpoints, config: Path | None, overrides: list[str], nodes: int = 1, name: str | None = None,
           priority: int = 0, max_attempts: int = 3) -> JobState:
    """Validate the config, write the job's spec and state, enqueue it. Nothing is queued when any
    step fails: a bad config stops before any write, a failed enqueue removes what was written."""
    if nodes < 1:
        raise UsageError(f"--nodes {nodes}: must be >= 1")
    if max_attempts < 1:
        raise UsageError(f"--max-attempts {max_attempts}: must be >= 1")
    cfg = load_config(config, overrides)
    jobs, queue = where.jobs(), where.queue()
    queue.check()
    now = time.time()
    job_id = new_job_id(now)
    # A job's run is its own unless its config names an S3 store (local paths exist on one machine only).
    run_store = cfg.checkpoint.store if cfg.checkpoint.store.startswith("s3://") else jobs.run_store_for(job_id)
    resolved = cfg.to_dict()
    resolved["checkpoint"]["store"] = run_store
    label = name or (Path(config).stem if config else "job")
    spec = JobSpec(job_id, label, nodes, priority, max_attempts, run_store, resolved)
    state = JobState(job_id, label, nodes=nodes, priority=priority, max_attempts=max_attempts,
                     submitted_at=now, enqueued_at=now, updated_at=now)
    jobs.create(spec, state)
    try:
        queue.send(job_id)
    except AwsError:
        jobs.remove(job_id)
        raise
    return state


def list_jobs(where: Endpoints) -> list[JobState]:
    return sorted(where.jobs().all_states(), key=lambda j: (j.submitted_at, j.id))


def show(where: Endpoints, job_id: str) -> tuple[JobState, JobSpec]:
    jobs = where.jobs()
    return jobs.state(job_id)[0], jobs.spec(job_id)


def cancel(where: Endpoints, job_id: str) -> JobState:
    """Queued: cancelled now. Running: its agent sees the request, stops the run with a checkpoint
    (SIGTERM) and marks it cancelled. Already finished: a usage error."""
    jobs = where.jobs()
    current, _ = jobs.state(job_id)
    if current.state not in ("queued", "running"):
        raise UsageError(f"job {job_id} is already {current.state}: nothing to cancel")
    return jobs.update(job_id, policy.request_cancel)


def logs(where: Endpoints, job_id: str) -> list[tuple[str, bytes]]:
    return where.jobs().logs(job_id)


def requeue(jobs: JobsStore, queue: Queue, job_id: str, now: float) -> None:
    """Send a new message for a queued job and note when."""
    jobs.update(job_id, lambda s: replace(s, enqueued_at=now) if s.state == "queued" else None, now=now)
    queue.send(job_id)


__all__ = ["Endpoints", "submit", "list_jobs", "show", "cancel", "logs", "requeue"]
