"""CloudWatch custom metrics for a training run: batched PutMetricData off the training loop.

Dimensions Project, Environment and Run; metric names are the run layout's (Loss, ValLoss,
TokensPerSecond, Step, CheckpointSeconds, Interruptions, CostUSD) and the Terraform dashboard
draws them. `CloudWatchPublisher` buffers and sends in batches when asked; `BackgroundPublisher`
owns one in a thread of its own, so a caller's `put()` only enqueues: a slow or unreachable
endpoint never holds up a training step (the queue is bounded; when it is full, values are
dropped with one warning). A failing endpoint is logged; after `max_failures` flushes in a row
fail the publisher disables itself, because metrics must never slow down or stop training.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import queue
import threading
from typing import Any

log = logging.getLogger(__name__)

METRIC_NAMES = ("Loss", "ValLoss", "TokensPerSecond", "Step", "CheckpointSeconds", "Interruptions", "CostUSD")
DEFAULT_UNITS = {
    "Loss": "None",
    "ValLoss": "None",
    "TokensPerSecond": "Count/Second",
    "Step": "Count",
    "CheckpointSeconds": "Seconds",
    "Interruptions": "Count",
    "CostUSD": "None",
}
MAX_DATUMS_PER_CALL = 1000  # the PutMetricData limit
MAX_BUFFER = 10_000  # oldest datums are dropped past this, so a dead endpoint cannot grow memory
QUEUE_PUTS = 1_000  # puts a BackgroundPublisher holds before it drops (hours of logged steps)


class CloudWatchPublisher:
    """Buffers metric values and sends them in PutMetricData batches on `flush()`."""

    def __init__(self, namespace: str, project: str, environment: str, run: str, region: str | None = None,
                 profile: str | None = None, max_failures: int = 3) -> None:
        self.namespace = namespace
        self.dimensions = [{"Name": "Project", "Value": project}, {"Name": "Environment", "Value": environment},
                           {"Name": "Run", "Value": run or "unnamed"}]
        self.region = region
        self.profile = profile
        self.max_failures = max_failures
        self.failures = 0
        self.disabled = False
        self.sent = 0
        self._buffer: list[dict[str, Any]] = []
        self._client = None

    def put(self, metrics: dict[str, float], unit_map: dict[str, str] | None = None,
            timestamp: dt.datetime | None = None) -> None:
        """Queue one value per metric name; NaN/inf are skipped (CloudWatch rejects them)."""
        if self.disabled:
            return
        when = timestamp or dt.datetime.now(dt.timezone.utc)
        units = {**DEFAULT_UNITS, **(unit_map or {})}
        for name, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                log.debug("metric %s=%r is not a number: skipped", name, value)
                continue
            if not math.isfinite(number):
                log.debug("metric %s=%r is not finite: skipped", name, value)
                continue
            self._buffer.append({"MetricName": name, "Dimensions": self.dimensions, "Timestamp": when,
                                 "Value": number, "Unit": units.get(name, "None")})
        if len(self._buffer) > MAX_BUFFER:
            del self._buffer[: len(self._buffer) - MAX_BUFFER]

    def flush(self) -> bool:
        """Send everything buffered; False (logged, not raised) when CloudWatch refused."""
        if self.disabled or not self._buffer:
            return not self.disabled
        try:
            client = self._cloudwatch()
            while self._buffer:
                batch = self._buffer[:MAX_DATUMS_PER_CALL]
                client.put_metric_data(Namespace=self.namespace, MetricData=batch)
                del self._buffer[: len(batch)]
                self.sent += len(batch)
        except Exception as error:  # any failure: metrics must never stop training
            self.failures += 1
            log.warning("CloudWatch PutMetricData failed (%d/%d): %s", self.failures, self.max_failures,
                        " ".join(str(error).split()))
            if self.failures >= self.max_failures:
                self.disabled = True
                self._buffer.clear()
                log.warning("CloudWatch metrics disabled for this run after %d failures", self.failures)
            return False
        self.failures = 0
        return True

    def _cloudwatch(self):
        if self._client is None:
            from mamba_training.aws.session import client

            # Few quick retries: a slow endpoint must not hold up a training step.
            self._client = client("cloudwatch", region=self.region, profile=self.profile,
                                  retries={"mode": "standard", "max_attempts": 2},
                                  connect_timeout=3, read_timeout=5)
        return self._client


class BackgroundPublisher:
    """A CloudWatchPublisher in a daemon thread behind a bounded queue.

    `put()` timestamps the values and enqueues them without blocking; the thread drains
    everything queued into one flush (batches of up to 1,000 datums per call). `close(timeout)`
    sends what is queued and waits at most `timeout` seconds: an endpoint that never answers
    costs the caller that bound once, never a wait per step.
    """

    def __init__(self, publisher: CloudWatchPublisher, max_queued: int = QUEUE_PUTS) -> None:
        self.publisher = publisher
        self.dropped = 0
        self._queue: queue.Queue[tuple[dict[str, float], dt.datetime] | None] = queue.Queue(max_queued)
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="cloudwatch-metrics", daemon=True)
        self._thread.start()

    def put(self, metrics: dict[str, float]) -> None:
        if self._closed or self.publisher.disabled:
            return
        try:
            self._queue.put_nowait((dict(metrics), dt.datetime.now(dt.timezone.utc)))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:  # one warning, not one per step while the endpoint is away
                log.warning("CloudWatch metrics queue is full (%d puts waiting on a slow endpoint): "
                            "dropping new values until it drains", self._queue.maxsize)

    def close(self, timeout: float) -> bool:
        """Send what is queued, waiting at most `timeout` s; True when everything queued went out."""
        if not self._closed:
            self._closed = True
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass  # the thread sees _closed once it has drained the queue
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("CloudWatch metrics: %d puts not sent within %.0f s at close", self._queue.qsize(), timeout)
            return False
        if self.dropped:
            log.warning("CloudWatch metrics: %d puts were dropped while the queue was full", self.dropped)
        return self.publisher.failures == 0 and not self.publisher.disabled

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            stop = item is None
            if item is not None:
                self.publisher.put(item[0], timestamp=item[1])
            while not stop:  # take what else is waiting into the same flush
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    self.publisher.put(item[0], timestamp=item[1])
            self.publisher.flush()
            if stop or (self._closed and self._queue.empty()):
                return
