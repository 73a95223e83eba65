"""Where the rehearsal's disruptions land: at holds, the trainer's own hook (train/control.py).

Every fleet instance's trainers stop after each checkpoint step and wait (`MAMBA_TRAINING_HOLD_AT`,
one control folder per instance) until the rehearsal releases them or a stop cause arrives. The
rehearsal counts a held job's progress at the held step, fires the events that are then due, and
releases the holds, so a notice reaches a trainer that waits at a known step, whatever the
machine's speed; a job could otherwise run past a progress point between two of its ticks. The
decisions are pure functions, table-tested in tests/fleet/rehearsal/test_holds.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hold:
    """A trainer of `instance` waiting after `step` (its `reached-<step>` without a `release-<step>`)."""

    instance: str
    step: int


def hold_steps(jobs: list[tuple[int, int]]) -> tuple[int, ...]:
    """The steps to hold at, for jobs given as (checkpoint every_steps, max_steps): each job's
    checkpoint steps before its last (holding at the last would only delay its end)."""
    steps: set[int] = set()
    for every, max_steps in jobs:
        if every > 0:
            steps.update(range(every, max_steps, every))
    return tuple(sorted(steps))


def progress(committed: dict[str, int | None], held: dict[str, int], max_steps: dict[str, int]) -> float:
    """The fraction of all jobs' steps done: each job at its committed step, or at the step its
    trainers are held at when that is further (the hold's checkpoint may still be uploading)."""
    total = sum(max_steps.values())
    if total == 0:
        return 1.0
    done = sum(min(max(committed.get(job) or 0, held.get(job, 0)), steps) for job, steps in max_steps.items())
    return done / total


def held_steps(holds: list[Hold], job_of: dict[str, str | None]) -> dict[str, int]:
    """Per job, the furthest step one of its instances is held at."""
    found: dict[str, int] = {}
    for hold in holds:
        job = job_of.get(hold.instance)
        if job is not None:
            found[job] = max(found.get(job, 0), hold.step)
    return found


def releasable(holds: list[Hold], job_of: dict[str, str | None], noticed: set[str]) -> list[Hold]:
    """The holds to release now. Not a noticed instance's: its trainers leave the hold on the notice
    and stop at the held step. Nor any other of that job's nodes: a multi-node job's ranks leave a
    hold together, so releasing one node would carry the noticed one past the step too."""
    noticed_jobs = {job_of.get(i) for i in noticed} - {None}
    return [h for h in holds if h.instance not in noticed and job_of.get(h.instance) not in noticed_jobs]


__all__ = ["Hold", "hold_steps", "progress", "held_steps", "releasable"]
