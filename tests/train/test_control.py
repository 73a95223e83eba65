"""The rehearsal/test hook: parsing its environment, holding at a step, the step-counting clock."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from mamba_training.errors import UsageError
from mamba_training.train.control import (
    CONTROL_DIR,
    FAKE_SECONDS_PER_STEP,
    HOLD_AT,
    Control,
    reached_path,
    release_path,
)


@pytest.mark.parametrize(("env", "hold", "seconds"), [
    ({}, frozenset(), None),
    ({HOLD_AT: "10", CONTROL_DIR: "/tmp/c"}, frozenset({10}), None),
    ({HOLD_AT: " 3, 8 ,8,", CONTROL_DIR: "/tmp/c"}, frozenset({3, 8}), None),
    ({FAKE_SECONDS_PER_STEP: "2.5"}, frozenset(), 2.5),
    ({HOLD_AT: "", FAKE_SECONDS_PER_STEP: "0"}, frozenset(), 0.0),
])
def test_from_env(env, hold, seconds) -> None:
    control = Control.from_env(env)
    assert control.hold_at == hold and control.seconds_per_step == seconds


@pytest.mark.parametrize(("env", "culprit"), [
    ({HOLD_AT: "ten", CONTROL_DIR: "/tmp/c"}, HOLD_AT),
    ({HOLD_AT: "-1", CONTROL_DIR: "/tmp/c"}, HOLD_AT),
    ({HOLD_AT: "4"}, CONTROL_DIR),
    ({FAKE_SECONDS_PER_STEP: "fast"}, FAKE_SECONDS_PER_STEP),
    ({FAKE_SECONDS_PER_STEP: "-2"}, FAKE_SECONDS_PER_STEP),
])
def test_bad_values_name_the_variable(env, culprit) -> None:
    with pytest.raises(UsageError, match=culprit):
        Control.from_env(env)


def test_a_step_that_is_not_held_returns_at_once(tmp_path: Path) -> None:
    Control(frozenset({5}), tmp_path).hold(4, writes=True, pending=lambda: False)
    assert list(tmp_path.iterdir()) == []


def test_hold_announces_the_step_and_waits_for_the_release(tmp_path: Path) -> None:
    control = Control(frozenset({5}), tmp_path / "ctl")
    done = threading.Event()
    thread = threading.Thread(target=lambda: (control.hold(5, writes=True, pending=lambda: False), done.set()))
    thread.start()
    reached = reached_path(tmp_path / "ctl", 5)
    for _ in range(6000):  # the event, not a duration: up to a minute for the file to appear
        if reached.exists():
            break
        threading.Event().wait(0.01)
    assert json.loads(reached.read_text()) == {"step": 5, "pid": os.getpid()}
    assert not done.is_set()  # still held: nothing released it
    release_path(tmp_path / "ctl", 5).touch()
    thread.join(60)
    assert done.is_set()


def test_a_pending_cause_releases_the_hold_and_only_the_writer_announces(tmp_path: Path) -> None:
    calls = []

    def pending() -> bool:
        calls.append(1)
        return len(calls) >= 3  # the third poll sees a signal

    Control(frozenset({2}), tmp_path).hold(2, writes=False, pending=pending)
    assert len(calls) == 3 and not reached_path(tmp_path, 2).exists()


def test_every_rank_leaves_when_any_rank_wants_to(tmp_path: Path) -> None:
    votes = []

    def agree(leave: bool) -> bool:  # stands in for the all-reduce: another rank saw the release
        votes.append(leave)
        return len(votes) >= 2

    Control(frozenset({1}), tmp_path).hold(1, writes=False, pending=lambda: False, agree=agree)
    assert votes == [False, False]


def test_the_ledger_clock_counts_seconds_per_step() -> None:
    steps = [0]
    clock = Control(seconds_per_step=2.0).ledger_clock(lambda: steps[0])
    start = clock()
    steps[0] = 7
    assert clock() - start == 14.0
    assert Control().ledger_clock(lambda: 0) is time.time
