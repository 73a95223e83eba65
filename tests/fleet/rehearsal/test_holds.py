"""Where a rehearsal's disruptions land (fleet/rehearsal/holds.py), on tables of cases."""

from __future__ import annotations

import pytest

from mamba_training.fleet.rehearsal.holds import Hold, hold_steps, progress, releasable


@pytest.mark.parametrize("jobs, steps", [
    ([(10, 60)], (11, 21, 31, 41, 51)),  # one past each checkpoint step (its save is then in flight)
    ([(10, 20)], (11,)),
    ([(10, 11)], ()),  # never at the last step
    ([(10, 10)], ()),  # a job as short as one checkpoint: nothing to hold
    ([(10, 30), (25, 60)], (11, 21, 26, 51)),  # the union of two jobs'
    ([(0, 30)], ()),  # no periodic checkpoints
])
def test_hold_steps_are_one_past_each_checkpoint_step_before_the_last(jobs, steps) -> None:
    assert hold_steps(jobs) == steps


@pytest.mark.parametrize("committed, expected", [
    ({"a": None, "b": None}, 0.0),
    ({"a": 10, "b": None}, 10 / 80),
    ({"a": 20, "b": 5}, 25 / 80),
    ({"a": 99, "b": 60}, 80 / 80),  # capped at each job's max
    ({}, 0.0),  # not read yet
])
def test_progress_counts_each_job_at_its_committed_step(committed, expected) -> None:
    assert progress(committed, {"a": 20, "b": 60}) == pytest.approx(expected)


def test_progress_of_no_steps_is_complete() -> None:
    assert progress({}, {}) == 1.0


A, B, C = Hold("i-a", 11), Hold("i-b", 11), Hold("i-c", 21)  # waiting for checkpoints 10, 10, 20
ALL_COMMITTED = {"j1": 10, "j2": 10, "j3": 20}


@pytest.mark.parametrize("job_of, noticed, released", [
    ({"i-a": "j1", "i-b": "j2", "i-c": "j3"}, set(), [A, B, C]),  # nothing noticed: all go on
    ({"i-a": "j1", "i-b": "j2", "i-c": "j3"}, {"i-a"}, [B, C]),  # the noticed one stops at its step
    # a multi-node job: its other node stays held with the noticed one (its ranks leave together)
    ({"i-a": "j1", "i-b": "j1", "i-c": "j3"}, {"i-a"}, [C]),
    # the noticed node's agent has released its slot (lease gone): the survivor goes on
    ({"i-a": None, "i-b": "j1", "i-c": "j3"}, {"i-a"}, [B, C]),
    # an instance whose job is unknown (between jobs) is not held back for nothing
    ({}, {"i-x"}, [A, B, C]),
])
def test_releasable_keeps_the_noticed_instance_and_its_jobs_other_nodes_held(job_of, noticed, released) -> None:
    assert releasable([A, B, C], job_of, noticed, ALL_COMMITTED) == released


@pytest.mark.parametrize("committed, released", [
    ({"j1": None, "j3": 10}, []),  # neither awaited checkpoint is durable yet: the events wait for it
    ({"j1": 10, "j3": 10}, [A, B]),  # j1's step 10 is committed; j3's 20 still uploading
    ({"j1": 20, "j3": 20}, [A, B, C]),  # a later commit covers the awaited one too
    ({}, []),
])
def test_a_hold_is_released_only_once_the_checkpoint_it_waits_for_is_committed(committed, released) -> None:
    assert releasable([A, B, C], {"i-a": "j1", "i-b": "j1", "i-c": "j3"}, set(), committed) == released
