"""CloudWatchPublisher: batched PutMetricData to the moto server; failures never reach the trainer."""

from __future__ import annotations

import datetime as dt
import logging

from mamba_training.aws.metrics import CloudWatchPublisher
from mamba_training.aws.session import client
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
