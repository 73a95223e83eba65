"""The interruption plan is a pure function of its seed and flags (tables of cases)."""

from __future__ import annotations

import pytest

from mamba_training.errors import UsageError
from mamba_training.fleet.rehearsal.schedule import (HARD_KILL, MAX_TIMED_EVENTS, NOTICE, PROGRESS_WINDOW, choose,
                                                   notice_seconds, plan)

SEED = 1234


def test_the_same_seed_gives_the_same_plan_and_another_seed_another() -> None:
    print(f"seed {SEED}")
    assert plan(SEED, interruptions=5, hard_kills=2) == plan(SEED, interruptions=5, hard_kills=2)
    assert plan(SEED, interruptions=5) != plan(SEED + 1, interruptions=5)


@pytest.mark.parametrize("count, kills", [(1, 0), (2, 0), (2, 1), (5, 2), (5, 5), (0, 0)])
def test_counted_plans_fire_on_progress_in_order_inside_the_window(count: int, kills: int) -> None:
    events = plan(SEED, interruptions=count, hard_kills=kills)
    assert len(events) == count
    assert [e.kind for e in events].count(HARD_KILL) == kills
    fractions = [e.at_progress for e in events]
    assert fractions == sorted(fractions)
    low, high = PROGRESS_WINDOW
    assert all(low <= f < high for f in fractions)
    # stratified: exactly one event per equal slice of the window
    width = (high - low) / count if count else 1
    assert [int((f - low) // width) for f in fractions] == list(range(count))
    assert all(e.at_busy_seconds is None for e in events)
    assert all(not e.rebalance_first for e in events if e.kind == HARD_KILL)


def test_timed_plans_have_exponential_gaps_with_the_given_mean() -> None:
    events = plan(SEED, every_seconds=30.0, hard_kills=3)
    times = [e.at_busy_seconds for e in events]
    assert times == sorted(times) and times[0] > 0
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert 27 < sum(gaps) / len(gaps) < 33  # a thousand draws: the mean is within 10 %
    assert [e.index for e in events if e.kind == HARD_KILL] and \
        all(e.index < 6 for e in events if e.kind == HARD_KILL)  # the kills come early


def test_rebalance_share_zero_and_one() -> None:
    assert not any(e.rebalance_first for e in plan(SEED, interruptions=6, rebalance_share=0.0))
    assert all(e.rebalance_first for e in plan(SEED, interruptions=6, rebalance_share=1.0))


@pytest.mark.parametrize("progress, busy, due", [(0.0, 0.0, False), (0.5, 0.0, True), (0.49, 1e9, False)])
def test_progress_events_are_due_on_progress_only(progress: float, busy: float, due: bool) -> None:
    event = plan(SEED, interruptions=1)[0]
    event = type(event)(**{**event.__dict__, "at_progress": 0.5})
    assert event.due(progress, busy) is due


@pytest.mark.parametrize("kwargs, message", [
    (dict(interruptions=2, every_seconds=5.0), "exclude each other"),
    (dict(interruptions=-1), "--interruptions -1"),
    (dict(every_seconds=0.0), "--interrupt-every 0.0"),
    (dict(interruptions=1, hard_kills=2), "--hard-kills 2"),
    (dict(hard_kills=-1), "--hard-kills -1"),
    (dict(interruptions=1, rebalance_share=1.5), "rebalance share"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        plan(SEED, **kwargs)


@pytest.mark.parametrize("pick, candidates, chosen", [
    (0.0, ["i-b", "i-a"], "i-a"), (0.49, ["i-b", "i-a"], "i-a"), (0.5, ["i-b", "i-a"], "i-b"),
    (0.999, ["i-c", "i-a", "i-b"], "i-c"), (0.3, [], None),
])
def test_choose_picks_by_sorted_position(pick: float, candidates: list[str], chosen: str | None) -> None:
    assert choose(pick, candidates) == chosen


@pytest.mark.parametrize("compression, seconds", [(1.0, 120.0), (8.0, 15.0), (120.0, 1.0)])
def test_the_notice_window_is_compressed(compression: float, seconds: float) -> None:
    assert notice_seconds(compression) == seconds


def test_a_compression_below_one_is_refused() -> None:
    with pytest.raises(UsageError, match="--notice-compression 0.5"):
        notice_seconds(0.5)


def test_kinds_are_notice_or_hard_kill() -> None:
    assert {e.kind for e in plan(SEED, interruptions=8, hard_kills=3)} == {NOTICE, HARD_KILL}


# ---------------------------------------------------------------- --interrupt-every and --hard-kills
@pytest.mark.parametrize("progress, busy, due", [
    (0.0, 0.0, False), (0.99, 11.9, False), (0.0, 12.0, True), (1.0, 1e9, True),
])
def test_timed_events_are_due_on_busy_seconds_only(progress: float, busy: float, due: bool) -> None:
    event = plan(SEED, every_seconds=10.0)[0]
    event = type(event)(**{**event.__dict__, "at_busy_seconds": 12.0})
    assert event.at_progress is None and event.due(progress, busy) is due


@pytest.mark.parametrize("kills", [0, 1, 3])
def test_a_timed_plan_has_exactly_its_hard_kills_among_the_first_events(kills: int) -> None:
    events = plan(SEED, every_seconds=20.0, hard_kills=kills)
    indices = [e.index for e in events if e.kind == HARD_KILL]
    assert len(indices) == kills and all(i < 2 * kills for i in indices)
    assert [e.index for e in events] == list(range(len(events)))
    times = [e.at_busy_seconds for e in events]
    assert all(b > a for a, b in zip(times, times[1:])) and all(e.at_progress is None for e in events)


def test_the_mean_gap_scales_a_timed_plan_and_the_seed_fixes_its_shape() -> None:
    # Exponential gaps are the mean times a seeded draw: doubling --interrupt-every doubles every time.
    short, long = plan(SEED, every_seconds=5.0, hard_kills=2), plan(SEED, every_seconds=10.0, hard_kills=2)
    assert [e.kind for e in short] == [e.kind for e in long] and [e.pick for e in short] == [e.pick for e in long]
    assert all(abs(b.at_busy_seconds - 2 * a.at_busy_seconds) < 0.002 for a, b in zip(short, long))
    assert plan(SEED, every_seconds=5.0) == plan(SEED, every_seconds=5.0)


def test_a_timed_plan_is_finite_and_refuses_more_kills_than_events() -> None:
    assert len(plan(SEED, every_seconds=1.0)) == MAX_TIMED_EVENTS
    with pytest.raises(UsageError, match=f"--hard-kills {MAX_TIMED_EVENTS + 1}: at most {MAX_TIMED_EVENTS}"):
        plan(SEED, every_seconds=1.0, hard_kills=MAX_TIMED_EVENTS + 1)


@pytest.mark.parametrize("count, kills", [(1, 1), (2, 1), (2, 2), (6, 2)])
def test_counted_hard_kills_come_among_the_first_events_and_carry_no_rebalance(count: int, kills: int) -> None:
    events = plan(SEED, interruptions=count, hard_kills=kills, rebalance_share=1.0)
    assert [e.kind for e in events].count(HARD_KILL) == kills
    assert all(e.index < 2 * kills for e in events if e.kind == HARD_KILL)
    assert all(e.rebalance_first is (e.kind == NOTICE) for e in events)


@pytest.mark.parametrize("seed", range(8))
def test_with_as_many_kills_as_interruptions_every_event_is_a_kill(seed: int) -> None:
    assert {e.kind for e in plan(seed, interruptions=3, hard_kills=3)} == {HARD_KILL}
