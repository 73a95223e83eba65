"""Metric sinks the trainer writes to at each logged step and checkpoint commit: TensorBoard and
CloudWatch (the run's own metrics.jsonl is train/records.py's). A sink never blocks or stops
training: CloudWatch publishes from a background thread, and a sink that raises is dropped."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Our metric field -> CloudWatch metric name (the Terraform dashboard uses these names).
CLOUDWATCH_NAMES = {
    "loss": "Loss",
    "val_loss": "ValLoss",
    "tokens_per_s": "TokensPerSecond",
    "step": "Step",
    "checkpoint_s": "CheckpointSeconds",
    "interruptions": "Interruptions",
    "cost_usd": "CostUSD",
}


class MetricSink(Protocol):
    def write(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(f"train/{name}", value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class CloudWatchSink:
    """CloudWatch metrics off the training loop: `write()` only enqueues for a background thread
    that batches PutMetricData (aws.metrics.BackgroundPublisher); failures are logged, never raised.
    `close()` sends what is queued and waits at most `close_timeout` seconds."""

    def __init__(self, namespace: str, project: str, environment: str, run: str, region: str | None,
                 profile: str | None, close_timeout: float = 10.0) -> None:
        from mamba_training.aws.metrics import BackgroundPublisher, CloudWatchPublisher

        self.close_timeout = close_timeout
        self.publisher = BackgroundPublisher(
            CloudWatchPublisher(namespace, project, environment, run, region=region, profile=profile))

    def write(self, step: int, values: dict[str, float]) -> None:
        named = {CLOUDWATCH_NAMES[k]: float(v) for k, v in values.items() if k in CLOUDWATCH_NAMES}
        if named:
            self.publisher.put(named)

    def close(self) -> bool:
        return self.publisher.close(self.close_timeout)


class Sinks:
    """Fan-out to every configured sink; a failing sink is logged and dropped, training goes on."""

    def __init__(self, sinks: list[Any]) -> None:
        self._sinks = list(sinks)

    def write(self, step: int, values: dict[str, float]) -> None:
        for sink in list(self._sinks):
            try:
                sink.write(step, values)
            except Exception as error:  # a metrics backend must never stop training
                log.warning("metric sink %s failed and is disabled: %s", type(sink).__name__, error)
                self._sinks.remove(sink)

    def close(self) -> None:
        for sink in self._sinks:
            try:
                sink.close()
            except Exception as error:
                log.warning("closing metric sink %s failed: %s", type(sink).__name__, error)
