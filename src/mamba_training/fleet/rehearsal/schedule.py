"""The seeded interruption schedule of a rehearsal: which disruption comes when, decided up front.

A plan is a pure function of its inputs (seed, count or mean gap, hard kills, rebalance share),
so a seed names one rehearsal's disruptions exactly. Two ways to say when:

* `--interruptions N`: N events triggered by *progress* (the fraction of all jobs' steps done),
  at seeded fractions spread over the middle of the work, so an event always lands on a job that
  is running whatever the machine's speed;
* `--interrupt-every S`: events triggered by *busy time* (seconds during which some job runs),
  with exponentially distributed gaps of mean S (a Poisson process, like independent reclaims).

`hard_kills` of the events (chosen by the seed) are kills without notice; the others are spot
notices, each preceded, with probability `rebalance_share`, by a rebalance recommendation to
the same instance. `pick` chooses the target among the busy instances when the event fires.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mamba_training.errors import UsageError

NOTICE = "notice"
HARD_KILL = "hard-kill"
KINDS = (NOTICE, HARD_KILL)
AWS_NOTICE_SECONDS = 120.0
# Progress-triggered events land between these fractions of the work: not before anything is
# running, and not so late that the job finishes before the notice's deadline.
PROGRESS_WINDOW = (0.2, 0.8)
MAX_TIMED_EVENTS = 1000  # a timed plan is finite; no rehearsal lives through a thousand reclaims


@dataclass(frozen=True)
class Event:
    """One planned disruption. Exactly one of `at_progress` / `at_busy_seconds` is set."""

    index: int
    kind: str  # NOTICE or HARD_KILL
    pick: float  # in [0, 1): which busy instance (sorted by id) it hits
    rebalance_first: bool  # a rebalance recommendation precedes the notice
    at_progress: float | None = None  # fraction of all jobs' steps done
    at_busy_seconds: float | None = None  # seconds with at least one job running

    def due(self, progress: float, busy_seconds: float) -> bool:
        if self.at_progress is not None:
            return progress >= self.at_progress
        return self.at_busy_seconds is not None and busy_seconds >= self.at_busy_seconds


def plan(seed: int, *, interruptions: int | None = None, every_seconds: float | None = None,
         hard_kills: int = 0, rebalance_share: float = 0.5) -> list[Event]:
    """The rehearsal's disruptions in firing order; bad arguments are a UsageError naming the flag."""
    if interruptions is not None and every_seconds is not None:
        raise UsageError("--interruptions and --interrupt-every exclude each other: give one")
    if interruptions is not None and interruptions < 0:
        raise UsageError(f"--interruptions {interruptions}: must be >= 0")
    if every_seconds is not None and not every_seconds > 0:
        raise UsageError(f"--interrupt-every {every_seconds}: must be > 0 seconds")
    if hard_kills < 0:
        raise UsageError(f"--hard-kills {hard_kills}: must be >= 0")
    if not 0.0 <= rebalance_share <= 1.0:
        raise UsageError(f"rebalance share {rebalance_share}: must be within 0..1")
    rng = random.Random(seed)
    if every_seconds is None:
        count = interruptions if interruptions is not None else 0
        if hard_kills > count:
            raise UsageError(f"--hard-kills {hard_kills}: more than the {count} interruptions (--interruptions)")
        low, high = PROGRESS_WINDOW
        # Stratified: one fraction per equal slice of the window, so events never bunch up.
        width = (high - low) / count if count else 0.0
        triggers = [dict(at_progress=round(low + width * (i + rng.random()), 6)) for i in range(count)]
    else:
        count = MAX_TIMED_EVENTS
        if hard_kills > count:
            raise UsageError(f"--hard-kills {hard_kills}: at most {count}")
        at, triggers = 0.0, []
        for _ in range(count):
            at += rng.expovariate(1.0 / every_seconds)
            triggers.append(dict(at_busy_seconds=round(at, 3)))
    # Hard kills among the first events, so a short rehearsal sees them too.
    kills = set(rng.sample(range(min(count, 2 * hard_kills)), hard_kills)) if hard_kills else set()
    events = []
    for i, trigger in enumerate(triggers):
        kind = HARD_KILL if i in kills else NOTICE
        rebalance = kind == NOTICE and rng.random() < rebalance_share
        events.append(Event(index=i, kind=kind, pick=rng.random(), rebalance_first=rebalance, **trigger))
    return events


def choose(pick: float, candidates: list[str]) -> str | None:
    """The instance `pick` names among `candidates` (in sorted order), or None when there is none."""
    if not candidates:
        return None
    ordered = sorted(candidates)
    return ordered[min(int(pick * len(ordered)), len(ordered) - 1)]


def notice_seconds(compression: float) -> float:
    """AWS's two-minute notice, compressed: the seconds between a notice and the reclaim."""
    if not compression >= 1.0:
        raise UsageError(f"--notice-compression {compression}: must be >= 1 (1 = AWS's real 120 s)")
    return AWS_NOTICE_SECONDS / compression


__all__ = ["Event", "plan", "choose", "notice_seconds", "NOTICE", "HARD_KILL", "KINDS", "AWS_NOTICE_SECONDS"]
