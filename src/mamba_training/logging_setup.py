"""One logging setup for the package: human lines on the console, JSON lines in the run's log."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

_JSON_HANDLER = "mamba_training.jsonl"
progress_log = logging.getLogger("mamba_training.progress")


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and any `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class _StderrHandler(logging.StreamHandler):
    """Console lines on whatever `sys.stderr` is when a record is written, not the one set up
    first: a caller that swaps stderr (a test's capture, an embedding program) still gets them."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(level: str = "info", console: bool = True) -> None:
    """Configure the package logger once: console lines at `level`."""
    logger = logging.getLogger("mamba_training")
    logger.setLevel(level.upper())
    logger.propagate = False
    if console and not any(getattr(h, "_mt_console", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
        handler._mt_console = True  # type: ignore[attr-defined]
        handler.addFilter(lambda record: getattr(record, "console", True))  # extra={"console": False}: log file only
        logger.addHandler(handler)


def add_json_log(path: str | Path) -> logging.Handler:
    """Also write every package log record as a JSON line to `path` (the run's log)."""
    logger = logging.getLogger("mamba_training")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.set_name(_JSON_HANDLER)
    handler.setFormatter(JsonLineFormatter())
    logger.addHandler(handler)
    return handler


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def log_progress(step: int, max_steps: int, loss: float, tokens_per_s: float, eta_s: float | None,
                 console: bool, val_loss: float | None = None) -> None:
    """One record per logged step: a short human line on the console (when `console`), and the
    same numbers as JSON fields on the run's log (`"event": "progress"`).

    The console line reads `step 130/1000  loss 2.1003  1,234 tok/s  ETA 5m12s`; the instance's
    check_status.sh reads the step from it, so keep the `step N/M` head.
    """
    eta = "-" if eta_s is None else _duration(eta_s)
    fields = {"event": "progress", "step": step, "max_steps": max_steps, "loss": round(float(loss), 6),
              "tokens_per_s": round(float(tokens_per_s), 1),
              "eta_s": None if eta_s is None else round(eta_s, 1)}
    if val_loss is not None:
        fields["val_loss"] = round(float(val_loss), 6)
    progress_log.info("step %d/%d  loss %.4f  %s tok/s  ETA %s", step, max_steps, loss, f"{tokens_per_s:,.0f}", eta,
                      extra={"fields": fields, "console": console})
