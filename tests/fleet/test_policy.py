"""The fleet's decisions, on tables of cases (fleet/policy.py is pure: no I/O, no clock)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone

import pytest

from mamba_training.fleet import policy
from mamba_training.fleet.jobs import JobState, Lease
from mamba_training.fleet.policy import Bounds, Schedule

RUNNING = JobState("j", "job", state="running", attempts=1, runs=1, max_attempts=3, holder="i-1/7")


@pytest.mark.parametrize(
    ("job", "code", "state", "attempts", "preemptions"),
    [
        (RUNNING, 0, "done", 1, 0),
        (RUNNING, 75, "queued", 0, 1),  # preempted: the attempt is given back
        (replace(RUNNING, attempts=3), 75, "queued", 2, 1),  # even on the last attempt
        (RUNNING, 2, "failed", 1, 0),  # bad config: never retried
        (RUNNING, 1, "queued", 1, 0),  # crash: retried
        (replace(RUNNING, attempts=2), 137, "queued", 2, 0),
        (replace(RUNNING, attempts=3), 1, "failed", 3, 0),  # crash on the last attempt: failed and kept
        (replace(RUNNING, cancel_requested=True), 75, "cancelled", 1, 0),  # cancel stops with a checkpoint
        (replace(RUNNING, cancel_requested=True), 1, "cancelled", 1, 0),
        (replace(RUNNING, cancel_requested=True), 0, "done", 1, 0),  # finished before the cancel landed
    ],
)
def test_next_state_maps_exit_codes(job: JobState, code: int, state: str, attempts: int, preemptions: int) -> None:
    after = policy.next_state(job, code)
    assert (after.state, after.attempts, after.preemptions) == (state, attempts, preemptions)
    assert after.holder is None and after.exit_codes[-1] == code


@pytest.mark.parametrize(
    ("job", "started"),
    [
        (JobState("j", "job"), True),
        (JobState("j", "job", state="running", holder="other"), False),
        (JobState("j", "job", cancel_requested=True), False),
        (JobState("j", "job", state="done"), False),
    ],
)
def test_start_run_only_starts_queued_jobs(job: JobState, started: bool) -> None:
    after = policy.start_run(job, "me", 1.0)
    assert (after is not None) == started
    if after is not None:
        assert (after.state, after.holder, after.attempts, after.runs) == ("running", "me", 1, 1)


@pytest.mark.parametrize(
    ("state", "result"),
    [("queued", "cancelled"), ("running", "running"), ("done", None), ("failed", None), ("cancelled", None)],
)
def test_request_cancel(state: str, result: str | None) -> None:
    after = policy.request_cancel(JobState("j", "job", state=state))
    assert (after.state if after else None) == result
    if after is not None:
        assert after.cancel_requested


@pytest.mark.parametrize("code, going_down, counted", [
    (-15, True, 75),   # SIGTERM to the whole tree on a reclaim, before the trainer's handler: preempted
    (-9, True, 75),    # the OS shutdown's SIGKILL
    (-15, False, -15),  # a signal from elsewhere is a failed attempt
    (1, True, 1),      # a real failure stays one, even on a dying instance
    (75, True, 75),
    (0, True, 0),
])
def test_a_run_killed_while_its_instance_goes_down_counts_as_preempted(code: int, going_down: bool,
                                                                       counted: int) -> None:
    assert policy.run_exit(code, going_down) == counted


def test_holder_lost_gives_the_attempt_back() -> None:
    after = policy.holder_lost(RUNNING)
    assert (after.state, after.attempts, after.holder, after.preemptions) == ("queued", 0, None, 1)


@pytest.mark.parametrize(
    ("priorities", "submitted", "expected"),
    [
        ([0, 0, 0], [3, 1, 2], "b"),  # oldest first
        ([0, 5, 1], [1, 3, 2], "b"),  # priority first
        ([], [], None),
    ],
)
def test_choose_job_by_priority_then_age(priorities: list[int], submitted: list[float], expected: str | None) -> None:
    jobs = [JobState(name, name, priority=p, submitted_at=t) for name, p, t in zip("abc", priorities, submitted)]
    chosen = policy.choose_job(jobs)
    assert (chosen.id if chosen else None) == expected


def test_choose_job_skips_jobs_that_are_not_runnable() -> None:
    jobs = [JobState("a", "a", state="running"), JobState("b", "b", cancel_requested=True), JobState("c", "c")]
    assert policy.choose_job(jobs).id == "c"


@pytest.mark.parametrize(
    ("idle_for", "in_group", "exit_when_idle", "action"),
    [
        (5, True, False, "wait"),
        (5, False, True, "wait"),
        (60, True, False, "leave"),
        (60, True, True, "leave"),
        (60, False, True, "exit"),
        (60, False, False, "wait"),  # nothing to terminate outside a group: keep serving
    ],
)
def test_idle_action(idle_for: float, in_group: bool, exit_when_idle: bool, action: str) -> None:
    assert policy.idle_action(idle_for, 30, in_group, exit_when_idle) == action


@pytest.mark.parametrize(
    ("job_state", "lease", "orphan"),
    [
        ("running", None, True),
        ("running", Lease("j", "a", 99.0), True),  # expired
        ("running", Lease("j", "a", 200.0, released=True), True),
        ("running", Lease("j", "a", 200.0), False),
        ("queued", None, False),
        ("done", None, False),
    ],
)
def test_orphaned(job_state: str, lease: Lease | None, orphan: bool) -> None:
    assert policy.orphaned(JobState("j", "j", state=job_state), lease, now=100.0) is orphan


@pytest.mark.parametrize(
    ("jobs", "schedule", "bounds", "desired"),
    [
        ([], None, Bounds(0, 10), 0),
        ([("queued", 1), ("running", 2), ("done", 4), ("failed", 1), ("cancelled", 1)], None, Bounds(0, 10), 3),
        ([("queued", 4), ("queued", 4)], None, Bounds(0, 5), 5),  # clamped to max
        ([], None, Bounds(1, 5), 1),  # never below min
        ([("queued", 3)], Schedule(max=0), Bounds(0, 5), 0),  # "no GPUs at weekends"
        ([("queued", 3)], Schedule(max=2), Bounds(0, 5), 2),
        ([], Schedule(min=2), Bounds(0, 5), 2),
        ([("queued", 3)], Schedule(min=None, max=None), Bounds(0, 5), 3),  # -1 fields change nothing
    ],
)
def test_desired_capacity(jobs: list[tuple[str, int]], schedule: Schedule | None, bounds: Bounds, desired: int) -> None:
    states = [JobState(f"j{i}", "j", state=s, nodes=n) for i, (s, n) in enumerate(jobs)]
    assert policy.desired_capacity(states, schedule, bounds) == desired


def test_desired_capacity_ignores_a_queued_job_being_cancelled() -> None:
    assert policy.desired_capacity([JobState("j", "j", cancel_requested=True)], None, Bounds(0, 5)) == 0


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("expression", "when", "fires"),
    [
        ("0 0 * * 6", "2026-12-05T00:00", True),  # Saturday midnight
        ("0 0 * * 6", "2026-12-06T00:00", False),
        ("0 0 * * sat", "2026-12-05T00:00", True),
        ("0 6 * * 1-5", "2026-12-01T06:00", True),  # Tuesday
        ("0 6 * * MON-FRI", "2026-12-06T06:00", False),  # Sunday
        ("*/15 * * * *", "2026-12-01T10:45", True),
        ("*/15 * * * *", "2026-12-01T10:46", False),
        ("0 0 * * 7", "2026-12-06T00:00", True),  # 7 is Sunday too
        ("30 8 1 jan *", "2027-01-01T08:30", True),
    ],
)
def test_cron_matches(expression: str, when: str, fires: bool) -> None:
    assert policy.cron_matches(expression, utc(when)) is fires


WEEKEND = [("0 0 * * 6", 0, 0), ("0 6 * * 1", None, 4)]  # Saturday: min/max 0; Monday 06:00: max 4, min -1


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        ("2026-12-05T12:00", Schedule(min=0, max=0)),  # Saturday
        ("2026-12-07T05:59", Schedule(min=0, max=0)),  # Monday before the weekend ends
        ("2026-12-07T06:00", Schedule(min=None, max=4)),
        ("2026-12-09T12:00", Schedule(min=None, max=4)),
    ],
)
def test_schedule_in_force_is_the_last_action_fired(now: str, expected: Schedule) -> None:
    assert policy.schedule_in_force(WEEKEND, utc(now)) == expected


def test_no_schedule_fired_within_a_week_means_none() -> None:
    assert policy.schedule_in_force([("0 0 1 1 *", None, 0)], utc("2026-06-15T00:00")) is None


@pytest.mark.parametrize(("age", "cancelled", "due"), [(10, False, False), (100, False, True), (100, True, False)])
def test_needs_message(age: float, cancelled: bool, due: bool) -> None:
    job = JobState("j", "j", enqueued_at=1000.0, cancel_requested=cancelled)
    assert policy.needs_message(job, 1000.0 + age, 60) is due


MULTI = replace(RUNNING, nodes=3)


@pytest.mark.parametrize(
    ("job", "wants"),
    [
        (JobState("j", "j"), True),
        (JobState("j", "j", state="running"), False),  # one node, already held
        (JobState("j", "j", state="running", nodes=2), True),  # a slot may be free
        (JobState("j", "j", state="running", nodes=2, cancel_requested=True), False),
        (JobState("j", "j", state="done", nodes=2), False),
    ],
)
def test_wants_node(job: JobState, wants: bool) -> None:
    assert policy.wants_node(job) is wants


@pytest.mark.parametrize(
    ("slot", "code", "state", "replace_node"),
    [
        (0, 0, "done", False),
        (0, 75, "queued", False),  # slot 0 leaving returns the job; a new agent claims slot 0
        (1, 75, "running", True),  # another node leaving: the job runs on, a replacement joins
        (2, 1, "running", True),
        (1, 0, "running", False),  # a node's 0 comes with slot 0's own 0
    ],
)
def test_node_exit_of_a_multi_node_job(slot: int, code: int, state: str, replace_node: bool) -> None:
    after = policy.node_exit(MULTI, slot, code) or MULTI
    assert after.state == state
    assert policy.replacement_needed(after, slot, code) is replace_node


@pytest.mark.parametrize(
    ("state", "nodes", "free", "due"),
    [("running", 2, 1, True), ("running", 2, 0, False), ("running", 1, 0, False), ("queued", 1, 0, True)],
)
def test_needs_message_for_free_node_slots(state: str, nodes: int, free: int, due: bool) -> None:
    job = JobState("j", "j", state=state, nodes=nodes, enqueued_at=0.0)
    assert policy.needs_message(job, 100.0, 60, free) is due
