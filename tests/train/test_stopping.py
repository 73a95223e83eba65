"""The stop decision as pure functions on tables of cases, and the stop path's handling of causes."""

from __future__ import annotations

import math
import os
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest

from mamba_training.spot import Interruption, LifecycleTerminating, Rebalance
from mamba_training.train.distributed import DistInfo
from mamba_training.train.stopping import (
    BUDGET,
    CONTINUE,
    NO_DEADLINE,
    NOTICE_CAP_SECONDS,
    PREEMPT,
    Decision,
    Observation,
    StopPath,
    decide,
    notice_deadline,
    save_fits,
)

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=__import__("torch").device("cpu"))


@pytest.mark.parametrize(("seen", "step", "saved", "expected"), [
    (Observation(), 5, 0, Decision(CONTINUE)),
    (Observation(save_due=True), 5, 0, Decision(CONTINUE, save=True)),
    (Observation(save_due=True), 5, 5, Decision(CONTINUE)),  # this step is saved already (e.g. restored)
    (Observation(early_save=True), 5, 0, Decision(CONTINUE, save=True, early=True)),
    (Observation(early_save=True), 5, 5, Decision(CONTINUE)),  # the rebalance finds the step saved
    (Observation(save_due=True, early_save=True), 5, 0, Decision(CONTINUE, save=True)),  # periodic wins
    (Observation(stop=BUDGET, save_due=True), 5, 0, Decision(BUDGET)),
    (Observation(stop=PREEMPT, seconds_left=100, save_seconds=3), 5, 0, Decision(PREEMPT, commit=True, seconds_left=100)),
    (Observation(stop=PREEMPT, seconds_left=2, save_seconds=3), 5, 0, Decision(PREEMPT, commit=False, seconds_left=2)),
    (Observation(stop=PREEMPT, seconds_left=0, save_seconds=0), 5, 0, Decision(PREEMPT, commit=True, seconds_left=0)),
    (Observation(stop=PREEMPT, early_save=True, save_due=True), 5, 0, Decision(PREEMPT, seconds_left=NO_DEADLINE)),
])
def test_decide(seen: Observation, step: int, saved: int, expected: Decision) -> None:
    assert decide(seen, step, saved) == expected


@pytest.mark.parametrize(("received", "now", "left", "expected"), [
    (100.0, 100.0, 120.0, 220.0),  # AWS's two minutes
    (100.0, 100.0, 7200.0, 100.0 + NOTICE_CAP_SECONDS),  # an instance clock two hours behind: capped
    (100.0, 105.0, 30.0, 135.0),  # the notice's own time, counted from now
    (100.0, 150.0, 100.0, 220.0),  # seen late: still at most 120 s after first sight
    (100.0, 100.0, 0.0, 220.0),  # a time already past counts as the full two minutes
    (100.0, 100.0, -5.0, 220.0),
    (100.0, 100.0, math.nan, 220.0),
])
def test_notice_deadline_is_capped_after_first_sight(received, now, left, expected) -> None:
    assert notice_deadline(received, now, left) == expected


@pytest.mark.parametrize(("left", "save", "fits"), [
    (100.0, 3.0, True), (3.0, 3.0, True), (2.9, 3.0, False), (0.0, 0.0, True), (0.0, 0.1, False),
])
def test_save_fits(left, save, fits) -> None:
    assert save_fits(left, save) is fits


@pytest.mark.parametrize("obs", [
    Observation(), Observation(PREEMPT, 12.5, True, True, 4.25), Observation(BUDGET, NO_DEADLINE, False, True, 0.0),
])
def test_an_observation_survives_the_vector_round_trip(obs: Observation) -> None:
    assert Observation.from_vector(obs.to_vector()) == obs


def test_the_max_of_vectors_is_the_most_urgent_cause_and_the_earliest_deadline() -> None:
    ranks = [Observation(CONTINUE, NO_DEADLINE, False, False, 7.0),
             Observation(PREEMPT, 90.0, False, True, 0.0),
             Observation(PREEMPT, 30.0, True, False, 0.0)]
    reduced = Observation.from_vector([max(col) for col in zip(*(o.to_vector() for o in ranks))])
    assert reduced == Observation(PREEMPT, 30.0, True, True, 7.0)


class FakeWatcher:
    def __init__(self) -> None:
        self.events: list = []

    def poll(self) -> list:
        events, self.events = self.events, []
        return events


def make_path(recorded: list, rebalance_checkpoint: bool = True) -> StopPath:
    path = StopPath(SINGLE, grace_seconds=30.0, rebalance_checkpoint=rebalance_checkpoint,
                    record=lambda kind, **fields: recorded.append((kind, fields)))
    path.watcher = FakeWatcher()
    return path


def test_a_notice_two_hours_ahead_still_gives_at_most_120_seconds() -> None:
    recorded: list = []
    path = make_path(recorded)
    received = time.monotonic()
    path.watcher.events.append(Interruption("terminate", datetime.now(timezone.utc) + timedelta(hours=2), received))
    decision = path.boundary(step=4, saved_step=0, save_due=False)
    assert decision.action == PREEMPT and decision.seconds_left <= NOTICE_CAP_SECONDS
    assert path.request.reason == "interruption:terminate"
    assert path.request.deadline <= received + NOTICE_CAP_SECONDS
    assert recorded[0][0] == "interruption" and recorded[0][1]["action"] == "terminate"


def test_the_first_cause_wins_and_later_events_are_still_recorded() -> None:
    recorded: list = []
    path = make_path(recorded)
    now = time.monotonic()
    path.watcher.events += [LifecycleTerminating("Terminated", now),
                            Interruption("stop", datetime.now(timezone.utc) + timedelta(seconds=120), now)]
    assert path.boundary(1, 0, False).action == PREEMPT
    assert path.request.reason == "lifecycle:terminating"
    assert [kind for kind, _ in recorded] == ["lifecycle", "interruption"]
    assert path.interruptions == 1


def test_a_rebalance_saves_once_and_training_goes_on() -> None:
    recorded: list = []
    path = make_path(recorded)
    path.watcher.events.append(Rebalance(None, time.monotonic()))
    assert path.boundary(3, 0, False) == Decision(CONTINUE, save=True, early=True)
    assert path.boundary(4, 3, False) == Decision(CONTINUE)  # taken: not again
    assert [kind for kind, _ in recorded] == ["rebalance"]


def test_a_rebalance_with_early_checkpoints_off_only_records() -> None:
    recorded: list = []
    path = make_path(recorded, rebalance_checkpoint=False)
    path.watcher.events.append(Rebalance(None, time.monotonic()))
    assert path.boundary(3, 0, False) == Decision(CONTINUE)
    assert [kind for kind, _ in recorded] == ["rebalance"]


def test_the_budget_stops_at_the_next_boundary() -> None:
    path = make_path([])
    assert path.boundary(2, 0, False).action == CONTINUE
    path.request_budget(0.01)
    assert path.pending() and path.boundary(3, 0, False).action == BUDGET


def test_sigterm_sets_a_stop_with_the_grace_deadline_and_a_peer_stop_takes_the_earliest() -> None:
    path = make_path([])
    path.install_signals()
    try:
        before = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        decision = path.boundary(7, 0, False)
    finally:
        path.restore_signals()
    assert decision.action == PREEMPT and 0 < decision.seconds_left <= 30.0
    assert path.request.reason == "signal:SIGTERM" and before <= path.request.received
    assert path.stop_request(Decision(PREEMPT, seconds_left=5.0)).deadline <= time.monotonic() + 5.0
    peer = make_path([]).stop_request(Decision(PREEMPT, seconds_left=10.0))
    assert peer.reason == "signal:peer" and peer.deadline <= time.monotonic() + 10.0
