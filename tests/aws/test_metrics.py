"""CloudWatch metrics: batched PutMetricData to the moto server, sent by a background thread so a
slow or dead endpoint never blocks the trainer's write(); failures never reach the trainer."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
from contextlib import contextmanager
from typing import Iterator

from mamba_training.aws.metrics import BackgroundPublisher, CloudWatchPublisher
from mamba_training.aws.session import client
from mamba_training.train.metrics import CLOUDWATCH_NAMES, CloudWatchSink
from tests.aws.moto_fleet import denying_endpoint

DIMS = [{"Name": "Project", "Value": "mamba-training"}, {"Name": "Environment", "Value": "dev"},
        {"Name": "Run", "Value": "tiny"}]


def _sum(name: str, start: dt.datetime) -> dict:
    stats = client("cloudwatch").get_metric_statistics(
        Namespace="MambaTraining", MetricName=name, Dimensions=DIMS, StartTime=start - dt.timedelta(minutes=5),
        EndTime=start + dt.timedelta(hours=2), Period=60, Statistics=["SampleCount", "Maximum"])
    points = stats["Datapoints"]
    return {"count": sum(p["SampleCount"] for p in points), "max": max((p["Maximum"] for p in points), default=None)}


def test_put_and_flush_publish_every_value_with_the_run_dimensions(aws):
    publisher = CloudWatchPublisher("MambaTraining", "mamba-training", "dev", "tiny")
    start = dt.datetime.now(dt.timezone.utc).replace(second=0, microsecond=0)
    for step in range(1, 601):  # 1,200 datums: more than one PutMetricData call holds
        publisher.put({"Loss": 5.0 - step / 1000, "Step": step}, timestamp=start + dt.timedelta(seconds=step))
    publisher.put({"TokensPerSecond": float("nan"), "CostUSD": 0.25})  # NaN is skipped, not sent
    assert publisher.flush() is True
    assert publisher.sent == 1201
    assert _sum("Step", start) == {"count": 600, "max": 600}
    assert _sum("Loss", start)["count"] == 600
    assert _sum("CostUSD", start) == {"count": 1, "max": 0.25}
    listed = client("cloudwatch").list_metrics(Namespace="MambaTraining", MetricName="Step")["Metrics"]
    assert listed and sorted(d["Name"] for d in listed[0]["Dimensions"]) == ["Environment", "Project", "Run"]
    assert _sum("TokensPerSecond", start)["count"] == 0


def test_refused_puts_are_logged_never_raised_and_disable_the_publisher(monkeypatch, caplog):
    with denying_endpoint() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        publisher = CloudWatchPublisher("MambaTraining", "mamba-training", "dev", "tiny", max_failures=3)
        with caplog.at_level(logging.WARNING, logger="mamba_training.aws.metrics"):
            results = []
            for step in range(5):
                publisher.put({"Step": step})
                results.append(publisher.flush())
    assert results == [False, False, False, False, False]
    assert publisher.disabled and publisher.failures == 3
    assert "AccessDenied" in caplog.text and "disabled" in caplog.text
    publisher.put({"Step": 9})  # a disabled publisher buffers nothing
    assert publisher._buffer == []


def test_a_success_resets_the_failure_count(aws, monkeypatch):
    publisher = CloudWatchPublisher("MambaTraining", "p", "e", "r", max_failures=2)
    with denying_endpoint() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        publisher.put({"Step": 1})
        assert publisher.flush() is False
    publisher._client = None  # reconnect to the moto server (as after a transient outage)
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws)
    publisher.put({"Step": 2})
    assert publisher.flush() is True and publisher.failures == 0 and not publisher.disabled
    assert publisher.sent == 2  # the datum buffered during the outage went out too


@contextmanager
def silent_endpoint() -> Iterator[tuple[str, threading.Event]]:
    """A loopback endpoint that reads requests and never answers; the event is set once a request
    has arrived (the caller is then stuck waiting for a response)."""
    server = socket.create_server(("127.0.0.1", 0))
    arrived, held = threading.Event(), []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            held.append(conn)
            if conn.recv(65536):
                arrived.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", arrived
    finally:
        server.close()
        for conn in held:
            conn.close()
        thread.join(10)


def test_the_sink_sends_every_write_from_its_thread_and_close_flushes_them(aws):
    sink = CloudWatchSink("MambaTraining", "mamba-training", "dev", "tiny", region=None, profile=None)
    start = dt.datetime.now(dt.timezone.utc).replace(second=0, microsecond=0)
    for step in range(1, 51):
        sink.write(step, {"loss": 5.0 - step / 100, "step": step, "lr": 0.001, "checkpoint_s": 0.5})
    assert sink.close() is True
    assert _sum("Step", start) == {"count": 50, "max": 50}
    assert _sum("Loss", start)["count"] == 50
    assert _sum("CheckpointSeconds", start) == {"count": 50, "max": 0.5}
    names = {m["MetricName"] for m in client("cloudwatch").list_metrics(Namespace="MambaTraining")["Metrics"]}
    assert names == {"Loss", "Step", "CheckpointSeconds"}  # lr has no CloudWatch name: not sent
    assert sink.publisher.dropped == 0 and not sink.publisher._thread.is_alive()


def test_write_returns_while_the_publisher_is_stuck_on_an_endpoint_that_never_answers(monkeypatch, caplog):
    with silent_endpoint() as (url, arrived):
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        publisher = CloudWatchPublisher("MambaTraining", "mamba-training", "dev", "tiny")
        # One attempt, a read timeout far beyond the test: the thread stays stuck until the end.
        publisher._client = client("cloudwatch", retries={"mode": "standard", "max_attempts": 1},
                                   connect_timeout=5, read_timeout=600)
        background = BackgroundPublisher(publisher, max_queued=4)
        with caplog.at_level(logging.WARNING, logger="mamba_training.aws.metrics"):
            background.put({"Step": 0})
            assert arrived.wait(60), "the publisher thread never called the endpoint"
            for step in range(1, 101):  # the caller goes on; the queue fills, then values drop
                background.put({"Step": step})
            assert background.dropped == 100 - 4
            assert caplog.text.count("queue is full") == 1
            assert background._thread.is_alive()  # still waiting for the first answer
            assert background.close(timeout=0.1) is False
        assert "not sent" in caplog.text
    background._thread.join(60)  # the endpoint closed the connection: the thread gives up and ends
    assert not background._thread.is_alive()


def test_every_metric_name_the_sink_maps_has_a_unit_and_is_published():
    from mamba_training.aws.metrics import DEFAULT_UNITS, METRIC_NAMES

    assert set(CLOUDWATCH_NAMES.values()) == set(METRIC_NAMES) == set(DEFAULT_UNITS)
