"""What a rehearsal proves, computed from what it saw: lost steps, goodput, identical weights, the PNG.

Lost steps come from the runs' own records, one JSON line per trained step (`train.log_every=1`,
which the rehearsal sets): every segment (process lifetime) of a job lists the steps it trained,
read from the instances' local folders, so a segment cut by a hard kill counts too, even though it
never uploaded its records. A step trained by two segments was lost once and trained again.
Only rank 0 writes records, and every rank trains the same global step, so a multi-node job's
segments are its rank 0's, on whichever node rank 0 ran in each round.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREEMPTED = 75
# Why a multi-node job has no bitwise comparison: its gradients are all-reduced over its ranks, so
# a one-process straight run differs in the last bits, and a straight run on as many nodes would
# double the rehearsal's load on the one machine.
MULTI_NODE_NOT_COMPARED = ("multi-node job: not trained straight (one process's weights differ in the last bits "
                           "from all-reduced ranks'; a straight multi-node run would double the load)")


@dataclass(frozen=True)
class Segment:
    """One training process's steps, and how it ended (the exit event's code; None: killed without one)."""

    name: str
    steps: tuple[int, ...]
    exit_code: int | None


def lost_steps(segments: list[Segment]) -> tuple[int, int]:
    """(all lost steps, lost after a notice) of one job: steps trained again by a later segment.

    A segment's loss is the steps it trained past the point the next segment resumed from; steps
    are attributed to the segment that trained them first and lost them.
    """
    ordered = sorted(segments, key=lambda s: (min(s.steps) if s.steps else 0, s.name))
    total = noticed = 0
    for i, segment in enumerate(ordered):
        later = {step for other in ordered[i + 1:] for step in other.steps}
        lost = len(set(segment.steps) & later)
        total += lost
        if segment.exit_code == PREEMPTED:
            noticed += lost
    return total, noticed


def goodput(final_steps: int, trained_steps: int) -> float:
    """Useful steps over steps trained (1.0: nothing was trained twice)."""
    return 1.0 if trained_steps == 0 else round(final_steps / trained_steps, 4)


def read_segments(run_dirs: list[Path]) -> list[Segment]:
    """Segments under local run folders (`records/<segment>/metrics.jsonl` and `events.jsonl`)."""
    found: dict[str, Segment] = {}
    for run_dir in run_dirs:
        for metrics in sorted(run_dir.glob("**/records/*/metrics.jsonl")):
            name = metrics.parent.name
            steps = tuple(row["step"] for row in _lines(metrics) if isinstance(row.get("step"), int))
            exits = [e for e in _lines(metrics.parent / "events.jsonl") if e.get("kind") == "exit"]
            code = exits[-1].get("exit_code") if exits else None
            if name not in found or len(steps) > len(found[name].steps):
                found[name] = Segment(name, steps, code)
    return list(found.values())


def _lines(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed process may be cut
        if isinstance(row, dict):
            rows.append(row)
    return rows


def same_weights(a: bytes, b: bytes) -> bool:
    """Whether two safetensors files hold the same tensors, bit for bit (names, dtypes, shapes, bytes)."""
    return _tensors(a) == _tensors(b)


def _tensors(data: bytes) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    # safetensors: an 8-byte little-endian header length, a JSON header of offsets, the raw bytes.
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    body = data[8 + size:]
    return {name: (info["dtype"], tuple(info["shape"]), body[info["data_offsets"][0]:info["data_offsets"][1]])
            for name, info in header.items() if name != "__metadata__"}


@dataclass
class JobReport:
    id: str
    name: str
    state: str
    nodes: int
    attempts: int
    preemptions: int
    final_step: int | None
    max_steps: int
    store: str
    trained_steps: int = 0
    lost_steps: int = 0
    lost_steps_after_notice: int = 0
    identical_to_straight: bool | None = None
    not_compared: str | None = None  # why identical_to_straight is None (or what made it False without comparing)
    progress: list[tuple[float, int]] = field(default_factory=list)  # (rehearsal seconds, committed step)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["progress"] = [list(p) for p in self.progress]
        return data


def summary(jobs: list[JobReport], disruptions: list[dict[str, Any]], capacity_history: list[int],
            capacity_timeline: list[tuple[float, int, int]], costs: tuple[float, float], extra: dict[str, Any]) -> dict:
    """The `--json` document."""
    spot, on_demand = costs
    final = sum(j.final_step or 0 for j in jobs if j.state == "done")
    trained = sum(j.trained_steps for j in jobs)
    kinds = [d["kind"] for d in disruptions]
    return {
        "jobs_completed": sum(j.state == "done" for j in jobs),
        "jobs_failed": sum(j.state == "failed" for j in jobs),
        "jobs_unfinished": sum(j.state not in ("done", "failed", "cancelled") for j in jobs),
        "interruptions": kinds.count("notice") + kinds.count("hard-kill"),
        "notices": kinds.count("notice"),
        "hard_kills": kinds.count("hard-kill"),
        "rebalance_recommendations": kinds.count("rebalance"),
        "lost_steps": sum(j.lost_steps for j in jobs),
        "lost_steps_after_notice": sum(j.lost_steps_after_notice for j in jobs),
        "trained_steps": trained,
        "goodput": goodput(final, trained),
        "capacity_history": capacity_history,
        "cost_spot_usd": round(spot, 6),
        "cost_on_demand_usd": round(on_demand, 6),
        "saving_percent": round(100 * (1 - spot / on_demand), 1) if on_demand else None,
        "jobs": [j.to_dict() for j in jobs],
        "disruptions": disruptions,
        "capacity_timeline": [list(c) for c in capacity_timeline],
        **extra,
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    """Jobs' committed steps over time with the disruptions marked, fleet size over time, cost over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (progress, fleet, cost) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for job in result["jobs"]:
        points = job["progress"] or [[0, 0]]
        progress.step([p[0] for p in points], [p[1] for p in points], where="post", label=job["name"])
    styles = {"notice": ("tab:orange", "--"), "hard-kill": ("tab:red", "-"), "rebalance": ("tab:gray", ":")}
    for kind, (color, style) in styles.items():
        for i, d in enumerate(d for d in result["disruptions"] if d["kind"] == kind):
            progress.axvline(d["at"], color=color, linestyle=style, label=kind if i == 0 else None)
    progress.set_ylabel("committed step")
    progress.legend(loc="upper left", fontsize="small")
    progress.set_title(f"rehearsal (seed {result.get('seed')}): {result['jobs_completed']} jobs done, "
                       f"{result['interruptions']} interruptions, {result['lost_steps']} steps lost")
    timeline = result["capacity_timeline"] or [[0, 0, 0]]
    fleet.step([c[0] for c in timeline], [c[1] for c in timeline], where="post", label="desired")
    fleet.step([c[0] for c in timeline], [c[2] for c in timeline], where="post", label="running")
    fleet.set_ylabel("instances")
    fleet.legend(loc="upper left", fontsize="small")
    series = result.get("cost_series") or [[0, 0, 0]]
    cost.plot([c[0] for c in series], [c[1] for c in series], label="spot (simulated market)")
    cost.plot([c[0] for c in series], [c[2] for c in series], label="on-demand, same instance-seconds")
    cost.set_ylabel("USD")
    cost.set_xlabel("seconds")
    cost.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


__all__ = ["Segment", "JobReport", "lost_steps", "goodput", "read_segments", "same_weights", "summary", "plot"]
