"""Where a rehearsal's disruptions land (fleet/rehearsal/holds.py), on tables of cases."""

from __future__ import annotations

import pytest

from mamba_training.fleet.rehearsal.holds import Hold, held_steps, hold_steps, progress, releasable


@pytest.mark.parametrize("jobs, steps", [
    ([(10, 60)], (10, 20, 30, 40, 50)),  # never at the last step
    ([(10, 20)], (10,)),
    ([(10, 10)], ()),  # a job as short as one checkpoint: nothing to hold
    ([(10, 30), (25, 60)], (10, 20, 25, 50)),  # the union of two jobs'
    ([(0, 30)], ()),  # no periodic checkpoints
])
def test_hold_steps_are_each_jobs_checkpoint_steps_before_its_last(jobs, steps) -> None:
    assert hold_steps(jobs) == steps


@pytest.mark.parametrize("committed, held, expected", [
    ({"a": None, "b": None}, {}, 0.0),
    ({"a": 10, "b": None}, {}, 10 / 80),
    ({"a": None, "b": None}, {"a": 10}, 10 / 80),  # held at 10 while its checkpoint uploads
    ({"a": 20, "b": 5}, {"a": 10}, 25 / 80),  # the committed step when it is further
    ({"a": 99, "b": 60}, {}, 80 / 80),  # capped at each job's max
])
def test_progress_counts_a_held_job_at_its_held_step(committed, held, expected) -> None:
    assert progress(committed, held, {"a": 20, "b": 60}) == pytest.approx(expected)


def test_progress_of_no_steps_is_complete() -> None:
    assert progress({}, {}, {}) == 1.0


def test_held_steps_take_each_jobs_furthest_hold_and_skip_unknown_instances() -> None:
    holds = [Hold("i-1", 10), Hold("i-2", 20), Hold("i-3", 10), Hold("i-9", 30)]
    assert held_steps(holds, {"i-1": "a", "i-2": "a", "i-3": "b", "i-9": None}) == {"a": 20, "b": 10}


A, B, C = Hold("i-a", 10), Hold("i-b", 10), Hold("i-c", 20)


@pytest.mark.parametrize("job_of, noticed, released", [
    ({"i-a": "j1", "i-b": "j2", "i-c": "j3"}, set(), [A, B, C]),  # nothing noticed: all go on
    ({"i-a": "j1", "i-b": "j2", "i-c": "j3"}, {"i-a"}, [B, C]),  # the noticed one stops at its step
    # a multi-node job: its other node stays held with the noticed one (its ranks leave together)
    ({"i-a": "j1", "i-b": "j1", "i-c": "j3"}, {"i-a"}, [C]),
    # the noticed node's agent has released its slot (lease gone): the survivor goes on
    ({"i-a": None, "i-b": "j1", "i-c": "j3"}, {"i-a"}, [B, C]),
    # an instance whose job is unknown (a lease read failed) is not held back for nothing
    ({}, {"i-x"}, [A, B, C]),
])
def test_releasable_keeps_the_noticed_instance_and_its_jobs_other_nodes_held(job_of, noticed, released) -> None:
    assert releasable([A, B, C], job_of, noticed) == released
