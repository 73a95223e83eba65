"""The fleet's decisions as pure functions of observed state (STYLE.md 15): no I/O, no clocks.

The agent and the reconciler read state, call these, and apply what they return; the tables of
cases live in tests/fleet/test_policy.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import lru_cache

from mamba_training.fleet.jobs import RUNNABLE, JobState, Lease

EXIT_DONE, EXIT_BAD_CONFIG, EXIT_PREEMPTED = 0, 2, 75


# --------------------------------------------------------------------------- job outcomes
def start_run(job: JobState, holder: str, now: float) -> JobState | None:
    """A queued job an agent has leased becomes running; anything else is not started."""
    if job.state != "queued" or job.cancel_requested:
        return None
    return replace(job, state="running", holder=holder, attempts=job.attempts + 1, runs=job.runs + 1, reason=None)


def next_state(job: JobState, exit_code: int) -> JobState:
    """What a run's exit code makes of a running job.

    0 done; a requested cancel wins over anything but success; 75 (preempted) runs again and the
    attempt is given back; 2 (bad config) can never heal, so it fails at once; anything else is
    retried until the job has spent `max_attempts`, then fails and stays for inspection.
    """
    ended = replace(job, holder=None, exit_codes=(*job.exit_codes, exit_code))
    if exit_code == EXIT_DONE:
        return replace(ended, state="done", reason=None)
    if job.cancel_requested:
        return replace(ended, state="cancelled", reason="cancelled by request")
    if exit_code == EXIT_PREEMPTED:
        return replace(ended, state="queued", attempts=max(0, job.attempts - 1), preemptions=job.preemptions + 1,
                       reason="preempted: resumes from its last checkpoint")
    if exit_code == EXIT_BAD_CONFIG:
        return replace(ended, state="failed", reason="exit 2: bad config or input; not retried")
    if job.attempts >= job.max_attempts:
        return replace(ended, state="failed", reason=f"exit {exit_code} on attempt {job.attempts} of {job.max_attempts}")
    return replace(ended, state="queued", reason=f"exit {exit_code} on attempt {job.attempts} of {job.max_attempts}; retrying")


def run_exit(exit_code: int, instance_going_down: bool) -> int:
    """The exit code a run counts with. A run killed by a signal while its instance is going
    down (a reclaim SIGTERMs the whole process tree, the trainer perhaps before it installed its
    own handler) lost its instance, not an attempt: it counts as preempted."""
    if exit_code < 0 and instance_going_down:
        return EXIT_PREEMPTED
    return exit_code


def holder_lost(job: JobState) -> JobState:
    """A running job whose holder vanished (its lease expired unrenewed): runnable again, and,
    like a preemption, not charged an attempt (spot instances can vanish without a notice)."""
    return replace(job, state="queued", holder=None, attempts=max(0, job.attempts - 1),
                   preemptions=job.preemptions + 1, reason="holder lost its lease: resumes from its last checkpoint")


def request_cancel(job: JobState) -> JobState | None:
    """Queued jobs are cancelled at once; running ones when their agent sees the request."""
    if job.state == "queued":
        return replace(job, state="cancelled", cancel_requested=True, reason="cancelled by request")
    if job.state == "running":
        return replace(job, cancel_requested=True)
    return None


def node_exit(job: JobState, slot: int, exit_code: int) -> JobState | None:
    """What one node's exit makes of the job. Slot 0's run decides the job (`next_state`); the
    other slots of a multi-node job only free their slot (the elastic launcher keeps the rest
    training; a 0 there comes with slot 0's own 0)."""
    return next_state(job, exit_code) if slot == 0 else None


def replacement_needed(job: JobState, slot: int, exit_code: int) -> bool:
    """After a node of a still-running multi-node job left unfinished, another node should join."""
    return slot > 0 and exit_code != EXIT_DONE and job.state == "running" and not job.cancel_requested


# --------------------------------------------------------------------------- agent choices
def wants_node(job: JobState) -> bool:
    """A job an idle agent may claim a node slot of: queued, or a multi-node job already running
    (one of its slots may be free: a node left, or it is still gathering its nodes)."""
    if job.cancel_requested:
        return False
    return job.state == "queued" or (job.state == "running" and job.nodes > 1)


def choose_job(candidates: list[JobState]) -> JobState | None:
    """The job to claim a node of first: highest priority, then the oldest submission."""
    runnable = [j for j in candidates if wants_node(j)]
    if not runnable:
        return None
    return min(runnable, key=lambda j: (-j.priority, j.submitted_at, j.id))


def idle_action(idle_for: float, idle_seconds: float, in_group: bool, exit_when_idle: bool) -> str:
    """"wait" for work, "leave" the group (protection off, terminate with decrement), or "exit".

    Outside a group nothing can be terminated, so an agent only exits when told to."""
    if idle_for < idle_seconds:
        return "wait"
    if in_group:
        return "leave"
    return "exit" if exit_when_idle else "wait"


def orphaned(job: JobState, lease: Lease | None, now: float) -> bool:
    """A running job nobody holds: its lease is absent, released, or expired unrenewed."""
    return job.state == "running" and (lease is None or lease.free(now))


def needs_message(job: JobState, now: float, requeue_after: float, free_slots: int = 0) -> bool:
    """A queued job (or a running multi-node job with a free slot) that has waited long enough
    that its message may have been lost."""
    if job.cancel_requested or now - job.enqueued_at < requeue_after:
        return False
    return job.state == "queued" or (job.state == "running" and free_slots > 0)


# --------------------------------------------------------------------------- capacity
@dataclass(frozen=True)
class Bounds:
    min: int
    max: int


@dataclass(frozen=True)
class Schedule:
    """The scheduled limits in force (None: no schedule says anything about that field)."""

    min: int | None = None
    max: int | None = None


def desired_capacity(jobs: list[JobState], schedule: Schedule | None, bounds: Bounds) -> int:
    """Σ nodes of runnable and running jobs, clamped to the group's bounds and the schedule."""
    need = sum(j.nodes for j in jobs if j.state in RUNNABLE and not (j.state == "queued" and j.cancel_requested))
    low, high = bounds.min, bounds.max
    if schedule is not None:
        if schedule.max is not None:
            high = min(high, schedule.max)
        if schedule.min is not None:
            low = max(low, schedule.min)
    return max(0, min(max(need, low), high))


# --------------------------------------------------------------------------- schedules
_NAMES = {
    4: {n: i for i, n in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
    3: {n: i + 1 for i, n in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                                        "nov", "dec"])},
}
_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def _field(text: str, position: int) -> set[int]:
    low, high = _RANGES[position]
    values: set[int] = set()
    for part in text.lower().split(","):
        body, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if body == "*":
            start, end = low, high
        else:
            first, _, last = body.partition("-")
            names = _NAMES.get(position, {})
            start = names[first] if first in names else int(first)
            end = (names[last] if last in names else int(last)) if last else (high if step_text else start)
        values.update(range(start, end + 1, step))
    if position == 4 and 7 in values:  # cron's Sunday is 0 or 7
        values.add(0)
    return values


@lru_cache(maxsize=64)
def _parse(expression: str) -> tuple[set[int], set[int], set[int], set[int], set[int], bool]:
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"cron expression {expression!r} needs 5 fields")
    minute, hour, day, month, weekday = (_field(f, i) for i, f in enumerate(fields))
    return minute, hour, day, month, weekday, fields[2] != "*" and fields[4] != "*"


def cron_matches(expression: str, when: datetime) -> bool:
    """Whether a five-field cron expression (minute hour day month weekday, UTC) fires at `when`."""
    minute, hour, day, month, weekday, both_days = _parse(expression)
    cron_weekday = (when.weekday() + 1) % 7  # Python: Monday 0; cron: Sunday 0
    day_ok = when.day in day
    weekday_ok = cron_weekday in weekday
    # cron: when both day fields are restricted, either may match
    if both_days:
        days = day_ok or weekday_ok
    else:
        days = day_ok and weekday_ok
    return when.minute in minute and when.hour in hour and when.month in month and days


def last_firing(expression: str, now: datetime, horizon: timedelta = timedelta(days=8)) -> datetime | None:
    """The most recent minute at or before `now` when the expression fired, within `horizon`."""
    when = now.replace(second=0, microsecond=0)
    end = when - horizon
    while when > end:
        if cron_matches(expression, when):
            return when
        when -= timedelta(minutes=1)
    return None


def schedule_in_force(actions: list[tuple[str, int | None, int | None]], now: datetime) -> Schedule | None:
    """The limits of the recurring action that fired last: (recurrence, min, max) each; None when
    none has fired within a week (so the group's own bounds rule)."""
    latest: tuple[datetime, int | None, int | None] | None = None
    for recurrence, low, high in actions:
        fired = last_firing(recurrence, now)
        if fired is not None and (latest is None or fired > latest[0]):
            latest = (fired, low, high)
    if latest is None:
        return None
    return Schedule(min=latest[1], max=latest[2])


__all__ = [
    "Bounds", "Schedule", "choose_job", "node_exit", "replacement_needed", "wants_node", "cron_matches", "desired_capacity", "holder_lost", "idle_action",
    "last_firing", "needs_message", "next_state", "orphaned", "request_cancel", "schedule_in_force", "start_run",
]
