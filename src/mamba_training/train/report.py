"""A run's report: one-screen summary, interruption list, and a PNG (loss, tokens/s, cost, interruptions).

Reads what the trainer recorded under `records/<segment>/` (see train/records.py) from any store.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from mamba_training.aws.cost import ledger_totals, per_million_tokens
from mamba_training.errors import UsageError
from mamba_training.train.records import EVENTS, LEDGER, METRICS, RunRecords, _json_lines, read_run

INTERRUPTION_KINDS = ("interruption", "rebalance", "signal", "lifecycle")
PREEMPTED_EXIT = 75


def load(store_url: str) -> RunRecords:
    """The run's records. Uses `read_run`; a local folder is read directly while the checkpoint
    package (which owns stores) has no `open_store` yet."""
    try:
        records = read_run(store_url)
    except ImportError:
        if "://" in store_url and not store_url.startswith("file://"):
            raise
        records = _read_local(Path(store_url.removeprefix("file://")))
    if not records.segments:
        raise UsageError(f"no run records under {store_url} (expected records/<segment>/ there)")
    return records


def _read_local(root: Path) -> RunRecords:
    records = RunRecords(url=str(root))
    for folder in sorted(p for p in (root / "records").glob("*") if p.is_dir()):
        records.segments.append(folder.name)
        if (folder / METRICS).is_file():
            records.metrics += [{**m, "segment": folder.name} for m in _json_lines((folder / METRICS).read_bytes())]
        if (folder / EVENTS).is_file():
            records.events += [{**e, "segment": folder.name} for e in _json_lines((folder / EVENTS).read_bytes())]
        if (folder / LEDGER).is_file():
            try:
                records.ledgers.append(json.loads((folder / LEDGER).read_text()))
            except json.JSONDecodeError:
                pass
    records.metrics.sort(key=lambda m: (m.get("time", ""), m.get("step", 0)))
    records.events.sort(key=lambda e: e.get("time", ""))
    return records


def interruptions(records: RunRecords) -> list[dict[str, Any]]:
    """Interruption notices, rebalance recommendations, signals, lifecycle changes and preempted exits."""
    rows = []
    for event in records.events:
        kind = event.get("kind")
        preempted_exit = kind == "exit" and event.get("exit_code") == PREEMPTED_EXIT
        if kind in INTERRUPTION_KINDS or preempted_exit:
            detail = {k: v for k, v in event.items() if k not in ("time", "kind", "step", "segment")}
            rows.append({"time": event.get("time"), "segment": event.get("segment"), "kind": kind,
                         "step": event.get("step"), "detail": detail})
    return rows


def describe_event(kind: str, step: int, fields: dict[str, Any]) -> str:
    """A run event (as events.jsonl records it) in words, for the log."""
    f = fields
    if kind == "checkpoint":
        return f"checkpoint step {f.get('checkpoint_step')} committed (noted at step {step}, {f.get('seconds')}s)"
    if kind in ("start", "resume"):
        ready = f", ready {f['startup_s']}s after the process started" if "startup_s" in f else ""
        what = "training starts" if kind == "start" else "resumed"
        return f"{what} at step {step} (world size {f.get('world_size')}, {f.get('device')}{ready})"
    if kind == "exit":
        committed = f", checkpoint step {f['committed_step']} durable" if f.get("committed_step") is not None else ""
        return (f"exit at step {step}: {f.get('reason')} (exit code {f.get('exit_code')}{committed}, "
                f"{f.get('lost_steps', 0)} steps lost)")
    if kind == "interruption":
        return f"spot interruption notice at step {step}: {f.get('action')} at {f.get('notice_time')}"
    if kind == "rebalance":
        return f"rebalance recommendation at step {step} (notice {f.get('notice_time')})"
    if kind == "lifecycle":
        return f"auto scaling lifecycle state {f.get('state')} at step {step}"
    if kind == "early_checkpoint":
        return f"early checkpoint at step {step} ({f.get('reason')})"
    if kind == "budget":
        return f"cost ${f.get('cost_usd')} is over train.max_cost_usd ${f.get('limit_usd')} at step {step}"
    details = ", ".join(f"{k} {v}" for k, v in f.items())
    return f"{kind.replace('_', ' ')} at step {step}" + (f": {details}" if details else "")


def interrupted_segments(records: RunRecords) -> set[str]:
    """Segments (process lifetimes) that an interruption ended or was ending: one each, however many
    records it left (the notice, then the preempted exit). Rebalance recommendations do not count."""
    found = set()
    for event in records.events:
        kind = event.get("kind")
        if kind in ("interruption", "signal", "lifecycle") or \
                (kind == "exit" and event.get("exit_code") == PREEMPTED_EXIT):
            found.add(str(event.get("segment")))
    return found


def segment_host(segment: str) -> str:
    """`20261128T100000Z-ip-10-0-1-5-4242` -> `ip-10-0-1-5` (segment ids are <time>-<host>-<pid>)."""
    parts = segment.split("-")
    return "-".join(parts[1:-1]) if len(parts) >= 3 else ""


def progress_by_host(records: RunRecords) -> dict[str, dict[str, Any]]:
    """host name -> {"run", "segment", "step"} of the newest segment each host ran."""
    run = records.url.rstrip("/").rsplit("/", 1)[-1]
    hosts: dict[str, dict[str, Any]] = {}
    for segment in sorted(records.segments):  # ids start with a UTC time: sorted = chronological
        steps = [int(m.get("step", 0)) for m in records.metrics if m.get("segment") == segment]
        steps += [int(e.get("step") or 0) for e in records.events if e.get("segment") == segment]
        hosts[segment_host(segment)] = {"run": run, "segment": segment, "step": max(steps, default=None)}
    return hosts


def _time(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def summary(records: RunRecords) -> dict[str, Any]:
    """The numbers a person wants first: progress, loss, speed, interruptions, cost."""
    metrics = records.metrics
    losses = [m["loss"] for m in metrics if isinstance(m.get("loss"), (int, float))]
    val = [m["val_loss"] for m in metrics if isinstance(m.get("val_loss"), (int, float))]
    speeds = sorted(m["tokens_per_s"] for m in metrics if isinstance(m.get("tokens_per_s"), (int, float)))
    times = [t for t in (_time(m.get("time")) for m in metrics + records.events) if t]
    totals = ledger_totals(records.ledgers)
    recorded_cost = max((m["cost_usd"] for m in metrics if isinstance(m.get("cost_usd"), (int, float))), default=0.0)
    cost = max(totals["cost_usd"], recorded_cost)
    tokens = max((int(m.get("tokens", 0)) for m in metrics), default=0)
    exits = [e for e in records.events if e.get("kind") == "exit"]
    return {
        "run": records.url,
        "segments": len(records.segments),
        "step": max((int(m.get("step", 0)) for m in metrics), default=0),
        "tokens": tokens,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "best_val_loss": min(val) if val else None,
        "median_tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
        "wall_hours": (max(times) - min(times)).total_seconds() / 3600 if len(times) > 1 else 0.0,
        "interruptions": len(interrupted_segments(records)),
        "lost_steps": sum(int(e.get("lost_steps") or 0) for e in exits),
        "last_exit": exits[-1].get("reason") if exits else None,
        "cost_usd": cost,
        "on_demand_cost_usd": totals["on_demand_cost_usd"] or None,
        "usd_per_million_tokens": per_million_tokens(cost, totals["tokens"] or tokens),
    }


def _hours(series: list[dict[str, Any]], origin: dt.datetime) -> list[float]:
    return [(_time(m.get("time")) - origin).total_seconds() / 3600 for m in series]


def _cost_points(records: RunRecords) -> list[tuple[dt.datetime, float]]:
    """Cumulative cost over time: each ledger adds its cost linearly over its lifetime (a constant
    price per process, the common case); without ledgers, the cost_usd the metrics carry."""
    points: list[tuple[dt.datetime, float]] = []
    total = 0.0
    for ledger in sorted(records.ledgers, key=lambda l: l.get("started", "")):
        start, end = _time(ledger.get("started")), _time(ledger.get("updated"))
        if start and end:
            points.append((start, total))
            total += float(ledger.get("cost_usd", 0.0))
            points.append((end, total))
    if points:
        return points
    return [(_time(m.get("time")), float(m["cost_usd"])) for m in records.metrics
            if isinstance(m.get("cost_usd"), (int, float)) and _time(m.get("time"))]


def _by_segment(rows: list[dict[str, Any]], key: str) -> list[list[dict[str, Any]]]:
    """Rows that carry `key`, split per segment so no line is drawn across a restart gap."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if isinstance(row.get(key), (int, float)) and _time(row.get("time")):
            groups.setdefault(str(row.get("segment", "")), []).append(row)
    return list(groups.values())


def plot(records: RunRecords, out: str | Path) -> Path:
    """Write the PNG report: loss (and val loss), tokens/s, cumulative cost; interruptions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stamps = [t for t in (_time(r.get("time")) for r in records.metrics + records.events) if t]
    origin = min(stamps) if stamps else dt.datetime.now(dt.timezone.utc)
    fig, (ax_loss, ax_speed, ax_cost) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    fig.suptitle(f"mamba-training run {records.url}")
    for i, rows in enumerate(_by_segment(records.metrics, "loss")):
        ax_loss.plot(_hours(rows, origin), [m["loss"] for m in rows], color="tab:blue",
                     label="loss" if i == 0 else None)
    for i, rows in enumerate(_by_segment(records.metrics, "val_loss")):
        ax_loss.plot(_hours(rows, origin), [m["val_loss"] for m in rows], "o-", color="tab:purple",
                     label="val loss" if i == 0 else None)
    ax_loss.set_ylabel("loss")
    for rows in _by_segment(records.metrics, "tokens_per_s"):
        ax_speed.plot(_hours(rows, origin), [m["tokens_per_s"] for m in rows], color="tab:green")
    ax_speed.set_ylabel("tokens / s")
    cost = _cost_points(records)
    ax_cost.plot([(t - origin).total_seconds() / 3600 for t, _ in cost], [c for _, c in cost], color="tab:red")
    ax_cost.set_ylabel("cumulative cost (USD)")
    ax_cost.set_xlabel("hours since the run started")
    for i, event in enumerate(interruptions(records)):
        when = _time(event.get("time"))
        if when is None:
            continue
        x = (when - origin).total_seconds() / 3600
        for ax in (ax_loss, ax_speed, ax_cost):
            ax.axvline(x, color="tab:orange", linestyle="--", linewidth=1,
                       label=("interruption / rebalance" if i == 0 and ax is ax_loss else None))
    ax_loss.legend(loc="upper right")
    for ax in (ax_loss, ax_speed, ax_cost):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
