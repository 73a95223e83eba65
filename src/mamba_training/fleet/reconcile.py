"""The reconciler: sizes the auto scaling group from the jobs that need nodes, and repairs jobs
whose agent vanished. One pass reads the jobs store and the group, asks fleet/policy.py, applies.

desired = clamp(Σ nodes of queued + running jobs, group min/max, the schedule in force). It calls
SetDesiredCapacity itself, so the fleet scales out from zero without any CloudWatch alarm (a
backlog-per-instance metric has no data point at zero instances). Scale-in picks only instances
without scale-in protection, and busy agents hold it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from mamba_training.aws import fleet as asg
from mamba_training.aws.queue import Queue
from mamba_training.errors import MambaTrainingError
from mamba_training.fleet import policy
from mamba_training.fleet.jobs import JobsStore
from mamba_training.fleet.operations import requeue

log = logging.getLogger(__name__)


@dataclass
class ReconcileOptions:
    queue_url: str
    store_url: str
    group: str
    interval_seconds: float = 30.0
    requeue_after_seconds: float = 900.0  # a queued job this old gets a fresh message


@dataclass
class Pass:
    desired_before: int
    desired: int
    need: int
    jobs: dict[str, int] = field(default_factory=dict)  # state -> count
    returned: list[str] = field(default_factory=list)  # running jobs whose holder vanished
    requeued: list[str] = field(default_factory=list)  # queued jobs given a fresh message
    schedule_max: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def reconcile_once(options: ReconcileOptions, now: float | None = None) -> Pass:
    now = time.time() if now is None else now
    jobs, queue = JobsStore(options.store_url), Queue(options.queue_url)
    states = jobs.all_states()
    returned, requeued = [], []
    for job in states:
        if job.state == "running" and policy.orphaned(job, jobs.lease(job.id)[0], now):
            jobs.update(job.id, lambda s: policy.holder_lost(s) if policy.orphaned(s, jobs.lease(s.id)[0], now)
                        else None, now=now)
            requeue(jobs, queue, job.id, now)
            returned.append(job.id)
        elif policy.needs_message(job, now, options.requeue_after_seconds,
                                  len(jobs.free_slots(job.id, job.nodes, now)) if job.nodes > 1 else 0):
            requeue(jobs, queue, job.id, now)
            requeued.append(job.id)
    states = jobs.all_states() if returned else states
    current = asg.capacity(options.group)
    actions = [(a.recurrence, a.min, a.max) for a in asg.scheduled_actions(options.group) if a.recurrence]
    schedule = policy.schedule_in_force(actions, datetime.fromtimestamp(now, timezone.utc))
    desired = policy.desired_capacity(states, schedule, policy.Bounds(current.min, current.max))
    if desired != current.desired:
        asg.set_desired(options.group, desired)
        log.info("%s: desired capacity %d -> %d", options.group, current.desired, desired)
    counts: dict[str, int] = {}
    for job in states:
        counts[job.state] = counts.get(job.state, 0) + 1
    need = sum(j.nodes for j in states if j.state in ("queued", "running"))
    return Pass(current.desired, desired, need, counts, returned, requeued,
                schedule.max if schedule is not None else None)


def reconcile_forever(options: ReconcileOptions, stop: threading.Event | None = None,
                      on_pass=None) -> None:
    """A pass every `interval_seconds` until `stop` is set; a failed pass is logged and retried."""
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            result = reconcile_once(options)
            if on_pass is not None:
                on_pass(result)
        except MambaTrainingError as error:
            log.warning("reconcile pass failed: %s", error)
        stop.wait(options.interval_seconds)


__all__ = ["ReconcileOptions", "Pass", "reconcile_once", "reconcile_forever"]
