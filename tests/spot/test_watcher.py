"""The watcher thread: typed events from the emulator, malformed notices, failures and recovery."""

from __future__ import annotations

import json
import logging
import socket
import time
from datetime import datetime, timedelta, timezone

import pytest

from mamba_training.spot import Interruption, LifecycleTerminating, Rebalance, Watcher, make_watcher
from mamba_training.spot.emulator import ImdsEmulator
from mamba_training.spot.watcher import NOTICE_SECONDS, parse_interruption, parse_rebalance, parse_time
from tests.spot.conftest import _wait_for

POLL = 0.02
GENEROUS = 30.0  # seconds to wait for an event that normally comes in milliseconds


@pytest.fixture
def wait_for():
    """The suite's wait_for, with a timeout no busy machine reaches."""
    return lambda predicate, timeout=GENEROUS: _wait_for(predicate, timeout)


class Clock:
    """Seconds since the epoch for the emulator, moved by the test (starts at the real time so
    notice times look like real ones to the watcher)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


def started(url: str, poll: float = POLL, **kwargs) -> Watcher:
    watcher = make_watcher(url, poll, timeout=10.0, **kwargs)
    assert watcher is not None
    return watcher.start()


def collect(watcher: Watcher, wait_for, count: int = 1, timeout: float = GENEROUS) -> list:
    events: list = []

    def enough() -> bool:
        events.extend(watcher.poll())
        return len(events) >= count

    wait_for(enough, timeout)
    return events


def assert_default_deadline(event: Interruption, before: datetime, after: datetime) -> None:
    """A malformed notice gets the two-minute deadline, counted from when it was received."""
    assert event.malformed
    received = event.time - timedelta(seconds=NOTICE_SECONDS)
    assert before <= received <= after
    assert event.seconds_left(received) == NOTICE_SECONDS


# ------------------------------------------------------------------ events
def test_no_notice_means_no_events(emulator: ImdsEmulator, wait_for) -> None:
    watcher = started(emulator.url)
    try:
        wait_for(lambda: watcher.polls >= 4)  # three whole rounds answered
        assert watcher.poll() == []
        assert watcher.failures == 0
    finally:
        watcher.stop()


@pytest.mark.parametrize("action", ["terminate", "stop", "hibernate"])
def test_interruption_notice_becomes_an_interruption_event(emulator: ImdsEmulator, wait_for, action: str) -> None:
    watcher = started(emulator.url)
    try:
        served = emulator.interrupt(action)
        (event,) = collect(watcher, wait_for)
    finally:
        watcher.stop()
    assert isinstance(event, Interruption)
    assert event.action == action and not event.malformed
    assert event.time == parse_time(served["time"])
    assert event.time.tzinfo is not None and event.time.utcoffset() == timedelta(0)
    assert event.seconds_left(parse_time(served["notice_time"])) == 120  # notice + 120 s
    assert event.seconds_left(event.time) == 0
    assert event.received_monotonic <= time.monotonic()


def test_rebalance_recommendation_becomes_a_rebalance_event(emulator: ImdsEmulator, wait_for) -> None:
    watcher = started(emulator.url)
    try:
        served = emulator.rebalance()
        (event,) = collect(watcher, wait_for)
    finally:
        watcher.stop()
    assert isinstance(event, Rebalance)
    assert event.notice_time == parse_time(served["noticeTime"])


def test_terminated_lifecycle_state_becomes_a_lifecycle_event(emulator: ImdsEmulator, wait_for) -> None:
    watcher = started(emulator.url)
    try:
        wait_for(lambda: watcher.polls >= 3)  # whole rounds that read InService
        assert watcher.poll() == []  # InService is not news
        emulator.set_lifecycle("Terminated")
        (event,) = collect(watcher, wait_for)
    finally:
        watcher.stop()
    assert event == LifecycleTerminating("Terminated", event.received_monotonic)


def test_a_scheduled_notice_arrives_after_its_delay(wait_for) -> None:
    clock = Clock()
    with ImdsEmulator(interrupt_after=30, rebalance_after=0.0, clock=clock) as emu:
        watcher = started(emu.url)
        try:
            first = collect(watcher, wait_for)
            assert [type(e) for e in first] == [Rebalance]
            seen = emu.state()["requests"]["GET spot/instance-action"]
            wait_for(lambda: emu.state()["requests"]["GET spot/instance-action"] >= seen + 3)
            assert watcher.poll() == []  # rounds before the delay is up see no notice
            clock.now += 30
            (event,) = collect(watcher, wait_for)
            assert isinstance(event, Interruption) and not event.malformed
            assert event.time == emu.now() + timedelta(seconds=NOTICE_SECONDS)
        finally:
            watcher.stop()


def test_the_same_payload_is_reported_once(emulator: ImdsEmulator, wait_for) -> None:
    emulator.interrupt("terminate")
    emulator.rebalance()
    emulator.set_lifecycle("Terminated")
    watcher = started(emulator.url)
    try:
        events = collect(watcher, wait_for, count=3)
        wait_for(lambda: emulator.state()["requests"].get("GET spot/instance-action", 0) > 10)
        assert watcher.poll() == []
        emulator.interrupt("stop")  # a new payload is news again
        (again,) = collect(watcher, wait_for)
    finally:
        watcher.stop()
    assert sorted(type(e).__name__ for e in events) == ["Interruption", "LifecycleTerminating", "Rebalance"]
    assert again.action == "stop"


def test_on_event_callback_sees_events_and_its_errors_do_not_stop_the_watcher(
    emulator: ImdsEmulator, wait_for, spot_logs
) -> None:
    calls: list = []

    def callback(event) -> None:
        calls.append(event)
        raise RuntimeError("callback bug")

    watcher = started(emulator.url, on_event=callback)
    try:
        emulator.rebalance()
        wait_for(lambda: len(calls) == 1)
        emulator.interrupt()
        wait_for(lambda: len(calls) == 2)
        assert [type(e) for e in watcher.poll()] == [Rebalance, Interruption]
    finally:
        watcher.stop()
    assert any("on_event callback failed" in m for m in spot_logs.messages(logging.ERROR))


def test_poll_never_blocks_and_stop_ends_the_thread(emulator: ImdsEmulator, wait_for) -> None:
    emulator.set_fault("timeout", seconds=600)  # every request hangs until the emulator stops
    watcher = make_watcher(emulator.url, POLL, timeout=GENEROUS)
    assert watcher is not None
    watcher.start()
    wait_for(lambda: emulator.state()["requests"])  # the first round is inside a request, held there
    assert watcher.poll() == []
    # poll() returned while the round was still stuck: had it waited, the round would have failed.
    assert (watcher.polls, watcher.failures) == (1, 0)
    emulator.stop()  # releases the held request
    watcher.stop(timeout=GENEROUS)
    assert watcher._thread is not None and not watcher._thread.is_alive()


def test_instance_info_from_the_watcher(emulator: ImdsEmulator) -> None:
    watcher = make_watcher(emulator.url)
    assert watcher is not None
    assert watcher.instance_info()["lifecycle"] == "spot"
    emulator.set_fault("500")
    assert watcher.instance_info()["instance_id"] == "i-0123456789abcdef0"  # cached once known


# ------------------------------------------------------------------ malformed notices
@pytest.mark.parametrize("mode", ["html", "truncated", "past-time", "bad-time"])
def test_a_malformed_notice_is_an_interruption_with_the_two_minute_default(
    emulator: ImdsEmulator, wait_for, spot_logs, mode: str
) -> None:
    watcher = started(emulator.url)
    try:
        before = datetime.now(timezone.utc)
        emulator.set_fault(mode)
        (event,) = collect(watcher, wait_for)
        after = datetime.now(timezone.utc)
    finally:
        watcher.stop()
    assert isinstance(event, Interruption) and event.action == "terminate"
    assert_default_deadline(event, before, after)
    assert any("malformed spot/instance-action payload" in m for m in spot_logs.messages(logging.WARNING))


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ('{"action": "reboot", "time": "2099-01-01T00:00:00Z"}', "unknown action"),
        ('["terminate"]', "not a JSON object"),
        ('{"action": "stop"}', "unparseable time"),
        ("", "not JSON"),
    ],
)
def test_parse_interruption_treats_odd_payloads_as_malformed(body: str, why: str, spot_logs) -> None:
    now = datetime.now(timezone.utc)
    event = parse_interruption(body, now, 12.5)
    assert event.malformed and event.received_monotonic == 12.5
    assert event.time == now + timedelta(seconds=NOTICE_SECONDS)
    assert any(why in m for m in spot_logs.messages(logging.WARNING))


def test_parse_interruption_keeps_a_valid_action_from_a_malformed_payload() -> None:
    now = datetime.now(timezone.utc)
    event = parse_interruption('{"action": "hibernate", "time": "yesterday"}', now, 0.0)
    assert event.malformed and event.action == "hibernate"


def test_parse_interruption_accepts_a_well_formed_notice() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    body = json.dumps({"action": "stop", "time": "2026-01-01T12:02:00Z"})
    event = parse_interruption(body, now, 3.0)
    assert not event.malformed and event.action == "stop"
    assert event.seconds_left(now) == 120.0


def test_parse_rebalance_without_a_time_is_still_a_recommendation() -> None:
    assert parse_rebalance("<html>", 1.0) == Rebalance(None, 1.0)
    assert parse_rebalance('{"noticeTime": "2026-01-01T00:00:00Z"}', 1.0).notice_time == datetime(
        2026, 1, 1, tzinfo=timezone.utc)


# ------------------------------------------------------------------ failures and recovery
@pytest.mark.parametrize("fault", [{"mode": "500"}, {"mode": "timeout", "seconds": 1.0},
                                   {"mode": "refuse-token", "status": 403},
                                   {"mode": "refuse-token", "status": 405}])
def test_service_failures_are_survived_and_events_arrive_after_recovery(
    emulator: ImdsEmulator, wait_for, spot_logs, fault: dict
) -> None:
    emulator.set_fault(**fault)
    emulator.interrupt("terminate")
    watcher = started(emulator.url, poll=0.02)
    watcher.client.timeout = 0.2
    try:
        wait_for(lambda: watcher.failures >= 3)
        assert watcher.poll() == []
        assert watcher._thread is not None and watcher._thread.is_alive()
        emulator.set_fault("none")
        (event,) = collect(watcher, wait_for)
        assert isinstance(event, Interruption) and not event.malformed
        wait_for(lambda: watcher.failures == 0)
    finally:
        watcher.stop()
    warnings = [m for m in spot_logs.messages(logging.WARNING) if "unavailable" in m]
    assert len(warnings) == 1, warnings  # one line per failure streak, not one per poll
    assert any("answering again after" in m for m in spot_logs.messages(logging.INFO))


def test_failures_back_off_exponentially_up_to_eight_intervals(emulator: ImdsEmulator) -> None:
    emulator.set_fault("500")
    watcher = make_watcher(emulator.url, 1.0)
    assert watcher is not None
    delays = [watcher.check_once() for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    emulator.set_fault("none")
    assert watcher.check_once() == 1.0
    slow = make_watcher(emulator.url, 5.0)
    emulator.set_fault("500")
    assert [slow.check_once() for _ in range(5)][-1] == 30.0  # capped at 30 s


def test_an_unreachable_service_is_survived_until_it_comes_up(wait_for) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    watcher = started(f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: watcher.failures >= 2)
        with ImdsEmulator(port=port) as emu:
            emu.interrupt("stop")
            (event,) = collect(watcher, wait_for)
            assert event.action == "stop"
    finally:
        watcher.stop()


def test_an_unexpected_bug_in_a_round_is_a_failure_not_a_dead_thread(emulator: ImdsEmulator, wait_for) -> None:
    watcher = started(emulator.url)
    original = watcher.client.get
    watcher.client.get = lambda path: (_ for _ in ()).throw(KeyError("boom"))  # type: ignore[method-assign]
    try:
        wait_for(lambda: watcher.failures >= 2)
        watcher.client.get = original  # type: ignore[method-assign]
        emulator.rebalance()
        (event,) = collect(watcher, wait_for)
        assert isinstance(event, Rebalance)
    finally:
        watcher.stop()
