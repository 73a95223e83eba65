"""Where the rehearsal's disruptions land: at holds, the trainer's own hook (train/control.py).

Every fleet instance's trainers stop one step past each checkpoint step N and wait
(`MAMBA_TRAINING_HOLD_AT`, one control folder per instance) until the rehearsal releases them or
a stop cause arrives. The trainer starts step N's save at the boundary before step N+1, so the
save is in flight when the hold begins; the rehearsal releases the hold once step N is committed
and the events then due have fired. A disruption thus reaches a trainer waiting at a known step
right after a durable commit, whatever the machine's speed (a job could otherwise run past a
progress point between two ticks): a notice loses nothing, a hard kill exactly the one step past
the commit. The decisions are pure functions, table-tested in tests/fleet/rehearsal/test_holds.py.
"""

from __future__ import annotations

from dataclasses import dataclass


PAST_CHECKPOINT = 1  # a hold sits this many steps past the checkpoint step it waits for


@dataclass(frozen=True)
class Hold:
    """A trainer of `instance` waiting after `step` (its `reached-<step>` without a `release-<step>`)."""

    instance: str
    step: int


def hold_steps(jobs: list[tuple[int, int]]) -> tuple[int, ...]:
    """The steps to hold at, for jobs given as (checkpoint every_steps, max_steps): one past each
    checkpoint step, before the job's last step (holding there would only delay its end)."""
    steps: set[int] = set()
    for every, max_steps in jobs:
        if every > 0:
            steps.update(range(every + PAST_CHECKPOINT, max_steps, every))
    return tuple(sorted(steps))


def progress(committed: dict[str, int | None], max_steps: dict[str, int]) -> float:
    """The fraction of all jobs' steps done, each job at its committed step."""
    total = sum(max_steps.values())
    if total == 0:
        return 1.0
    return sum(min(committed.get(job) or 0, steps) for job, steps in max_steps.items()) / total


def releasable(holds: list[Hold], job_of: dict[str, str | None], noticed: set[str],
               committed: dict[str, int | None]) -> list[Hold]:
    """The holds to release now (after the tick has fired what was due). Not one whose job has not
    committed the checkpoint it waits for: the progress that triggers events counts it only then. Not a
    noticed instance's: its trainers leave the hold on the notice and stop at the held step. Nor
    another node of that job: a multi-node job's ranks leave a hold together, so releasing one
    node would carry the noticed one past the step too. An instance whose job is unknown (between
    jobs, or its lease unreadable) is not held back."""
    noticed_jobs = {job_of.get(i) for i in noticed} - {None}
    released = []
    for hold in holds:
        job = job_of.get(hold.instance)
        if hold.instance in noticed or job in noticed_jobs:
            continue
        if job is not None and (committed.get(job) or 0) < hold.step - PAST_CHECKPOINT:
            continue
        released.append(hold)
    return released


__all__ = ["Hold", "PAST_CHECKPOINT", "hold_steps", "progress", "releasable"]
