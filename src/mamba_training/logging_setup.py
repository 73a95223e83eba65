"""One logging setup for the package: human lines on the console, JSON lines in the run's log."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

_JSON_HANDLER = "mamba_training.jsonl"


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


def setup_logging(level: str = "info", console: bool = True) -> None:
    """Configure the package logger once: console lines at `level`."""
    logger = logging.getLogger("mamba_training")
    logger.setLevel(level.upper())
    logger.propagate = False
    if console and not any(getattr(h, "_mt_console", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
        handler._mt_console = True  # type: ignore[attr-defined]
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
