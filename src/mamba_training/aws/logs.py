"""The fleet's CloudWatch Logs: read and follow `/aws/ec2/<project>-<env>/training`."""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Any, Callable, Iterator

from mamba_training.aws.fleet import Target
from mamba_training.aws.session import aws_errors
from mamba_training.errors import AwsError, UsageError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """`90s`, `15m`, `1h`, `2d`, `1w` ago, or an ISO-8601 date/time (UTC when no zone is given)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    text = text.strip()
    match = _DURATION.match(text.lower())
    if match:
        return now - dt.timedelta(seconds=float(match.group(1)) * _SECONDS[match.group(2)])
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text!r}: expected a duration like 1h, 30m, 2d or an ISO date/time") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _millis(when: dt.datetime) -> int:
    return round(when.timestamp() * 1000)


def fetch(target: Target, since: dt.datetime, pattern: str | None = None, logs=None,
          limit: int | None = None) -> list[dict[str, Any]]:
    """Events in the training log group from `since` on, oldest first (all streams)."""
    logs = logs or target.client("logs")
    args: dict[str, Any] = {"logGroupName": target.log_group, "startTime": _millis(since)}
    if pattern:
        args["filterPattern"] = pattern
    events: list[dict[str, Any]] = []
    with aws_errors(f"reading log group {target.log_group}"):
        try:
            while True:
                page = logs.filter_log_events(**args)
                events.extend(page.get("events", []))
                token = page.get("nextToken")
                if not token or (limit and len(events) >= limit):
                    break
                args["nextToken"] = token
        except logs.exceptions.ResourceNotFoundException:
            raise AwsError(f"log group {target.log_group} not found (check --project/--env/--region; "
                           "instances create it when they first log)") from None
    events.sort(key=lambda e: (e.get("timestamp", 0), e.get("eventId", "")))
    return events[-limit:] if limit else events


def follow(target: Target, since: dt.datetime, pattern: str | None = None, poll_seconds: float = 2.0,
           duration_s: float | None = None, sleep: Callable[[float], None] = time.sleep) -> Iterator[dict[str, Any]]:
    """Yield events as they arrive, polling; ends after `duration_s` (None: until the caller stops).

    Each poll asks again from the newest timestamp seen and drops event ids already shown, since
    several events may share a millisecond and late writers can land in the past.
    """
    logs = target.client("logs")
    deadline = None if duration_s is None else time.monotonic() + duration_s
    start = since
    seen: dict[str, int] = {}  # event id -> timestamp, kept only for the newest millisecond
    while True:
        for event in fetch(target, start, pattern, logs):
            if event.get("eventId") in seen:
                continue
            seen[event.get("eventId", "")] = event["timestamp"]
            start = max(start, dt.datetime.fromtimestamp(event["timestamp"] / 1000, dt.timezone.utc))
            yield event
        newest = _millis(start)
        seen = {key: stamp for key, stamp in seen.items() if stamp >= newest}
        if deadline is not None and time.monotonic() >= deadline:
            return
        sleep(poll_seconds if deadline is None else max(0.0, min(poll_seconds, deadline - time.monotonic())))
