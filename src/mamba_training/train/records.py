"""Run records: what a training process writes about itself, and reading them back from a store.

Each process lifetime is a *segment* with its own keys under `records/<segment>/` (metrics,
events, cost ledger, JSON log), so instances never write the same object and S3 needs no appends.
The trainer writes them locally and uploads them at each checkpoint commit and at exit.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
LEDGER = "ledger.json"
LOG = "train.log"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_segment_id() -> str:
    host = socket.gethostname().split(".")[0] or "host"
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{host}-{os.getpid()}"


class RecordWriter:
    """Appends JSON lines to this segment's metrics and events files in the run's local folder."""

    def __init__(self, local_run_dir: Path, segment: str) -> None:
        self.segment = segment
        self.dir = Path(local_run_dir) / "records" / segment
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def prefix(self) -> str:
        return f"records/{self.segment}"

    def metric(self, **fields: Any) -> dict[str, Any]:
        line = {"time": utc_now(), **fields}
        self._append(METRICS, line)
        return line

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        line = {"time": utc_now(), "kind": kind, **fields}
        self._append(EVENTS, line)
        return line

    def _append(self, name: str, line: dict[str, Any]) -> None:
        with open(self.dir / name, "a") as fh:
            fh.write(json.dumps(line, default=float) + "\n")
            fh.flush()


@dataclass
class RunRecords:
    """Everything recorded about one run, all segments merged in time order."""

    url: str
    segments: list[str] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    ledgers: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None


def _json_lines(blob: bytes) -> list[dict[str, Any]]:
    rows = []
    for line in blob.decode(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write; the rest of the file is still good
        if isinstance(row, dict):
            rows.append(row)
    return rows


ALL_RECORDS = (METRICS, EVENTS, LEDGER)


def read_run(store_url: str, only: tuple[str, ...] = ALL_RECORDS) -> RunRecords:
    """Read every segment's records (and the resolved config) of the run at `store_url`;
    `only=(LEDGER,)` reads just the cost ledgers (what a resuming trainer needs: one small
    object per segment instead of every segment's metrics), and no config."""
    from mamba_training.checkpoint import open_store

    store = open_store(store_url)
    records = RunRecords(url=store_url)
    by_segment: dict[str, dict[str, str]] = {}
    for obj in store.list("records/"):
        parts = obj.key.split("/")
        if len(parts) == 3 and parts[2] in only:
            by_segment.setdefault(parts[1], {})[parts[2]] = obj.key
    for segment in sorted(by_segment):
        files = by_segment[segment]
        records.segments.append(segment)
        if METRICS in files:
            records.metrics += [{**m, "segment": segment} for m in _json_lines(store.get_bytes(files[METRICS]))]
        if EVENTS in files:
            records.events += [{**e, "segment": segment} for e in _json_lines(store.get_bytes(files[EVENTS]))]
        if LEDGER in files:
            try:
                records.ledgers.append(json.loads(store.get_bytes(files[LEDGER])))
            except json.JSONDecodeError:
                pass
    if only == ALL_RECORDS and store.exists("config.yaml"):
        records.config = yaml.safe_load(store.get_bytes("config.yaml"))
    records.metrics.sort(key=lambda m: (m.get("time", ""), m.get("step", 0)))
    records.events.sort(key=lambda e: e.get("time", ""))
    return records
