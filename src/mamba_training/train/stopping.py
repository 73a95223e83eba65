"""The stop path: why training should stop, by when, and the one decision every rank takes.

Causes (docs/spot.md, docs/design.md "Stop path"): SIGTERM/SIGINT, a spot interruption notice, an
Auto Scaling lifecycle termination (each a stop with a deadline), a rebalance recommendation (an
early checkpoint), and the budget (a stop at the next boundary, exit 0). Signals and watcher
events only set local state here; nothing acts mid-step.

At every step boundary, before the next step draws its batch, `StopPath.boundary()` all-reduces
one small float64 vector (MAX; a minimum travels negated):

    [stop code, -seconds to the earliest deadline, checkpoint due, rebalance early save,
     seconds the last commit took]

and `decide()` turns the reduced vector into the same `Decision` on every rank: go on (maybe
after a checkpoint), stop for the budget, or stop for a preemption (and whether the emergency
checkpoint fits before the deadline). So no rank abandons a step that another rank is in the
middle of, and a stop on any node is a stop of all of them at the same step.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from mamba_training.spot import Interruption, LifecycleTerminating, Rebalance, Watcher
from mamba_training.train import distributed

log = logging.getLogger(__name__)

# Stop codes, most urgent highest: the all-reduce keeps the largest.
CONTINUE, BUDGET, PREEMPT = 0, 1, 2
# A notice's deadline is never later than this after we first see it, whatever its `time` says
# (an instance clock off by hours must not make the trainer believe it has hours).
NOTICE_CAP_SECONDS = 120.0
NO_DEADLINE = 1e12  # seconds left when no rank has a deadline (finite: it travels in a tensor)


@dataclass(frozen=True)
class StopRequest:
    reason: str  # interruption:<action> | lifecycle:terminating | signal:SIGTERM | signal:peer
    received: float  # time.monotonic() when this process learned of it
    deadline: float  # time.monotonic() by which the state must be durable


@dataclass(frozen=True)
class Observation:
    """One rank's view at a step boundary, or (after the all-reduce) all ranks' together."""

    stop: int = CONTINUE
    seconds_left: float = NO_DEADLINE
    save_due: bool = False
    early_save: bool = False
    save_seconds: float = 0.0

    def to_vector(self) -> list[float]:
        return [float(self.stop), -float(self.seconds_left), float(self.save_due), float(self.early_save),
                float(self.save_seconds)]

    @classmethod
    def from_vector(cls, vector: list[float]) -> "Observation":
        stop, neg_left, due, early, save_s = vector
        return cls(int(stop), -neg_left, due > 0, early > 0, save_s)


@dataclass(frozen=True)
class Decision:
    action: int  # CONTINUE | BUDGET | PREEMPT
    save: bool = False  # CONTINUE: checkpoint the current step before the next one
    early: bool = False  # the save is a rebalance early checkpoint
    commit: bool = True  # PREEMPT: an emergency checkpoint fits before the deadline
    seconds_left: float = NO_DEADLINE  # to the earliest deadline over all ranks


def notice_deadline(received: float, now: float, seconds_left: float, cap: float = NOTICE_CAP_SECONDS) -> float:
    """The monotonic deadline of a spot notice first seen at `received`, whose `time` is
    `seconds_left` after `now` by the instance clock: that time, but at most `cap` after receipt;
    a time already past counts as the full `cap` (the watcher treats it as malformed)."""
    if not seconds_left > 0:  # also NaN
        return received + cap
    return min(received + cap, now + seconds_left)


def save_fits(seconds_left: float, save_seconds: float) -> bool:
    """Whether a checkpoint that takes about `save_seconds` (the last commit's) can be durable
    in `seconds_left`; when it cannot, the last committed checkpoint stays authoritative."""
    return save_seconds <= seconds_left


def decide(seen: Observation, step: int, saved_step: int) -> Decision:
    """The boundary decision from all ranks' reduced observation. `saved_step` is the step of the
    last checkpoint handed off (the same on every rank)."""
    if seen.stop >= PREEMPT:
        return Decision(PREEMPT, commit=save_fits(seen.seconds_left, seen.save_seconds),
                        seconds_left=seen.seconds_left)
    if seen.stop >= BUDGET:
        return Decision(BUDGET, seconds_left=seen.seconds_left)
    fresh = step > saved_step
    return Decision(CONTINUE, save=fresh and (seen.save_due or seen.early_save),
                    early=fresh and seen.early_save and not seen.save_due)


class StopPath:
    """Collects this process's stop causes; `boundary()` turns them into the collective decision."""

    def __init__(self, dist: distributed.DistInfo, *, grace_seconds: float, rebalance_checkpoint: bool,
                 record: Callable[..., None]) -> None:
        self.dist = dist
        self.grace_seconds = grace_seconds
        self.rebalance_checkpoint = rebalance_checkpoint
        self.record = record  # the trainer's event recorder: record(kind, **fields)
        self.watcher: Watcher | None = None
        self.request: StopRequest | None = None
        self.early_save = False
        self.budget_cost: float | None = None
        self.save_seconds = 0.0  # the last commit's measured seconds (async saves too)
        self.interruptions = 0
        self._signals_seen = 0
        self._previous: dict[int, Any] = {}

    # ---- causes
    def install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def restore_signals(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals_seen += 1
        if self._signals_seen > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out now
        if self.request is None:
            now = time.monotonic()
            self.request = StopRequest(f"signal:{signal.Signals(signum).name}", now, now + self.grace_seconds)

    def poll(self) -> int:
        """Drain the watcher's events into stop state (and the run's events); returns how many."""
        if self.watcher is None:
            return 0
        events = self.watcher.poll()
        for event in events:
            if isinstance(event, Interruption):
                self.interruptions += 1
                now = time.monotonic()
                left = event.seconds_left()
                self.record("interruption", action=event.action, notice_time=str(event.time),
                            seconds_left=round(left, 1), malformed=event.malformed)
                if self.request is None:
                    received = event.received_monotonic
                    self.request = StopRequest(f"interruption:{event.action}", received,
                                               notice_deadline(received, now, left))
            elif isinstance(event, LifecycleTerminating):
                self.record("lifecycle", state=event.state)
                if self.request is None:
                    received = event.received_monotonic
                    self.request = StopRequest("lifecycle:terminating", received, received + self.grace_seconds)
            elif isinstance(event, Rebalance):
                self.record("rebalance", notice_time=str(event.notice_time))
                if self.rebalance_checkpoint:
                    self.early_save = True
        return len(events)

    def request_budget(self, cost: float) -> None:
        self.budget_cost = cost

    def note_commit(self, seconds: float) -> None:
        self.save_seconds = float(seconds)

    def pending(self) -> bool:
        """A cause waits for the next boundary (a hold releases on it)."""
        return self.request is not None or self.early_save or self.budget_cost is not None

    # ---- the decision
    def observe(self, save_due: bool) -> Observation:
        self.poll()
        if self.request is not None:
            stop, left = PREEMPT, max(0.0, self.request.deadline - time.monotonic())
        else:
            stop, left = (BUDGET if self.budget_cost is not None else CONTINUE), NO_DEADLINE
        return Observation(stop, left, save_due, self.early_save, self.save_seconds)

    def boundary(self, step: int, saved_step: int, save_due: bool) -> Decision:
        """All ranks call this at the same step boundary and get the same Decision."""
        local = self.observe(save_due)
        seen = Observation.from_vector(distributed.all_reduce_max_vector(local.to_vector(), self.dist))
        if seen.early_save:
            self.early_save = False  # every rank saw it: taken now, or moot (already saved, or stopping)
        return decide(seen, step, saved_step)

    def stop_request(self, decision: Decision) -> StopRequest:
        """What this rank stops for: its own cause, or a peer's (with the earliest deadline)."""
        now = time.monotonic()
        earliest = now + decision.seconds_left if math.isfinite(decision.seconds_left) else math.inf
        if self.request is not None:
            if earliest < self.request.deadline:
                return StopRequest(self.request.reason, self.request.received, earliest)
            return self.request
        return StopRequest("signal:peer", now, min(earliest, now + self.grace_seconds))


__all__ = ["StopPath", "StopRequest", "Observation", "Decision", "decide", "save_fits", "notice_deadline",
           "CONTINUE", "BUDGET", "PREEMPT", "NOTICE_CAP_SECONDS", "NO_DEADLINE"]
