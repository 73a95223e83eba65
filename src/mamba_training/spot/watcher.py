"""The spot watcher: a daemon thread that polls IMDS and turns answers into typed events.

The trainer creates it with `make_watcher(config.spot.imds_url, config.spot.poll_seconds)` and
calls `poll()` at each step boundary; `poll()` never blocks and nothing here ever raises into
the trainer. Polled paths (docs/design.md, "Spot protocol"):

- `spot/instance-action` -> `Interruption` (404 = no notice). A payload we cannot trust —
  HTML, truncated JSON, an unknown action, a time that is unparseable or already past — is
  logged and still treated as an interruption, with AWS's two-minute deadline counted from
  receipt: losing the instance unprepared costs more than an unneeded checkpoint.
- `events/recommendations/rebalance` -> `Rebalance`.
- `autoscaling/target-lifecycle-state` "Terminated" -> `LifecycleTerminating`.

Identical payloads are reported once (aws-node-termination-handler de-duplicates the same way).
Failures (refused connection, timeout, 5xx, a token endpoint refusing PUT) back off
exponentially up to 8 poll intervals (at most 30 s) and are logged once per failure streak.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Union

from mamba_training.spot.imds import (
    DEFAULT_TIMEOUT_S,
    INSTANCE_ACTION,
    LIFECYCLE_STATE,
    REBALANCE,
    ImdsClient,
    ImdsUnavailable,
    resolve_imds_url,
)

log = logging.getLogger(__name__)

NOTICE_SECONDS = 120.0  # AWS's spot notice; also the deadline we assume for a malformed notice
ACTIONS = ("terminate", "stop", "hibernate")
TERMINATING_STATES = ("Terminated", "Warmed:Terminated")
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class Interruption:
    """A spot interruption notice: the instance will be stopped/terminated/hibernated at `time`."""

    action: str
    time: datetime  # UTC, timezone-aware
    received_monotonic: float
    malformed: bool = False
    payload: str = ""

    def seconds_left(self, now: datetime | None = None) -> float:
        """Seconds until `time` (negative once it has passed)."""
        return (self.time - (now or datetime.now(timezone.utc))).total_seconds()


@dataclass(frozen=True)
class Rebalance:
    """A rebalance recommendation: elevated risk of interruption; checkpoint early, keep going."""

    notice_time: datetime | None
    received_monotonic: float


@dataclass(frozen=True)
class LifecycleTerminating:
    """The Auto Scaling group's target lifecycle state says this instance is being terminated."""

    state: str
    received_monotonic: float


SpotEvent = Union[Interruption, Rebalance, LifecycleTerminating]


def parse_time(text: object) -> datetime | None:
    """An ISO-8601 timestamp as an aware UTC datetime, or None when it cannot be read."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if value.tzinfo is None:  # IMDS times are UTC even when the zone is left out
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def parse_interruption(body: str, received_wall: datetime, received_monotonic: float) -> Interruption:
    """Read an instance-action payload; anything untrustworthy becomes a two-minute notice."""
    problem = None
    action, when = "terminate", None
    try:
        data = json.loads(body)
    except ValueError:
        data, problem = None, "not JSON"
    if problem is None and not isinstance(data, dict):
        problem = "not a JSON object"
    if problem is None:
        if data.get("action") in ACTIONS:
            action = data["action"]
        else:
            problem = f"unknown action {data.get('action')!r}"
        when = parse_time(data.get("time"))
        if when is None:
            problem = problem or f"unparseable time {data.get('time')!r}"
        elif when < received_wall:
            problem = problem or f"time {data.get('time')} is in the past"
    if problem is None:
        return Interruption(action, when, received_monotonic, malformed=False, payload=body)
    log.warning(
        "malformed spot/instance-action payload (%s): %r; treating it as a %s notice with a %.0f s deadline",
        problem, body[:200], action, NOTICE_SECONDS,
    )
    deadline = received_wall + timedelta(seconds=NOTICE_SECONDS)
    return Interruption(action, deadline, received_monotonic, malformed=True, payload=body)


def parse_rebalance(body: str, received_monotonic: float) -> Rebalance:
    try:
        data = json.loads(body)
        notice = parse_time(data.get("noticeTime")) if isinstance(data, dict) else None
    except ValueError:
        notice = None
    if notice is None:
        log.warning("malformed rebalance payload %r: treating it as a recommendation received now", body[:200])
    return Rebalance(notice, received_monotonic)


class Watcher:
    """Polls one metadata service from a daemon thread; `poll()` drains the events seen since."""

    def __init__(
        self,
        client: ImdsClient,
        poll_seconds: float = 5.0,
        on_event: Callable[[SpotEvent], None] | None = None,
    ) -> None:
        if poll_seconds <= 0:
            raise ValueError("poll_seconds must be > 0")
        self.client = client
        self.poll_seconds = poll_seconds
        self.on_event = on_event
        self._events: queue.SimpleQueue[SpotEvent] = queue.SimpleQueue()
        self._seen: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._info: dict[str, str | None] | None = None
        self.failures = 0  # current failure streak
        self.polls = 0

    @property
    def url(self) -> str:
        return self.client.base_url

    # -------------------------------------------------------------- lifecycle
    def start(self) -> "Watcher":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="spot-watcher", daemon=True)
            self._thread.start()
            log.info("spot watcher polling %s every %.3g s", self.url, self.poll_seconds)
        return self

    def stop(self, timeout: float = 1.0) -> None:
        """End polling; waits at most `timeout` s for a request in flight (the thread is a daemon)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def poll(self) -> list[SpotEvent]:
        """Every event seen since the last call, oldest first; never blocks."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def instance_info(self) -> dict[str, str | None]:
        """instance_id, instance_type, availability_zone, lifecycle; None where unknown."""
        if self._info is not None:
            return dict(self._info)
        try:
            info = self.client.instance_info()
        except Exception as error:  # never raise into the trainer
            log.warning("instance info unavailable: %s", error)
            info = dict.fromkeys(("instance_id", "instance_type", "availability_zone", "lifecycle"))
        if info.get("instance_id"):
            self._info = info
        return dict(info)

    # -------------------------------------------------------------- polling
    def _loop(self) -> None:
        while not self._stop.is_set():
            delay = self.check_once()
            self._stop.wait(delay)

    def check_once(self) -> float:
        """One round over the polled paths; returns how long to wait before the next round."""
        self.polls += 1
        try:
            self._check_paths()
        except ImdsUnavailable as error:
            return self._failed(str(error))
        except Exception as error:  # a bug here must not end the watcher, let alone training
            log.debug("spot watcher round failed", exc_info=True)
            return self._failed(f"{type(error).__name__}: {error}")
        if self.failures:
            log.info("IMDS %s answering again after %d failed polls", self.url, self.failures)
            self.failures = 0
        return self.poll_seconds

    def _check_paths(self) -> None:
        body = self.client.get(INSTANCE_ACTION)
        if body is not None and self._first_time(INSTANCE_ACTION, body):
            self._emit(parse_interruption(body, datetime.now(timezone.utc), time.monotonic()))
        body = self.client.get(REBALANCE)
        if body is not None and self._first_time(REBALANCE, body):
            self._emit(parse_rebalance(body, time.monotonic()))
        body = self.client.get(LIFECYCLE_STATE)
        state = (body or "").strip()
        if state in TERMINATING_STATES and self._first_time(LIFECYCLE_STATE, state):
            self._emit(LifecycleTerminating(state, time.monotonic()))

    def _first_time(self, path: str, payload: str) -> bool:
        key = (path, payload)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True

    def _emit(self, event: SpotEvent) -> None:
        if isinstance(event, Interruption) and not event.malformed:
            log.warning("spot interruption notice: %s at %s (%.0f s left)",
                        event.action, event.time.isoformat(), event.seconds_left())
        elif isinstance(event, Rebalance):
            log.warning("rebalance recommendation (notice time %s)", event.notice_time)
        elif isinstance(event, LifecycleTerminating):
            log.warning("auto scaling target lifecycle state: %s", event.state)
        self._events.put(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("spot on_event callback failed")

    def _failed(self, reason: str) -> float:
        self.failures += 1
        delay = min(self.poll_seconds * 2 ** min(self.failures - 1, 3), max(self.poll_seconds, MAX_BACKOFF_S))
        if self.failures == 1:
            log.warning("IMDS %s unavailable (%s): retrying with backoff; training continues", self.url, reason)
        else:
            log.debug("IMDS still unavailable (%d failures): %s", self.failures, reason)
        return delay


def make_watcher(
    imds_url_setting: str,
    poll_seconds: float = 5.0,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    on_event: Callable[[SpotEvent], None] | None = None,
    dmi_dir: str | None = None,
) -> Watcher | None:
    """A Watcher for `spot.imds_url` ("auto", "off" or a URL), or None when there is no IMDS.

    Creating it sends nothing; `start()` begins polling.
    """
    url = resolve_imds_url(imds_url_setting, dmi_dir)
    if url is None:
        return None
    return Watcher(ImdsClient(url, timeout=timeout), poll_seconds, on_event)


__all__ = [
    "Interruption", "Rebalance", "LifecycleTerminating", "SpotEvent", "Watcher", "make_watcher",
    "parse_interruption", "parse_rebalance", "parse_time", "NOTICE_SECONDS",
]
