"""The live view and the summary render (what a terminal shows), from a snapshot and a result."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from fleet.rehearsal.sample import a_result
from mamba_training.fleet.rehearsal.run import Snapshot
from mamba_training.fleet.rehearsal.view import live, summary


def render(renderable) -> str:
    out = io.StringIO()
    Console(file=out, width=120, no_color=True).print(renderable)
    return out.getvalue()


def test_the_live_view_shows_instances_jobs_interruptions_and_dollars() -> None:
    snapshot = Snapshot("running the jobs", 42.0, Path("/tmp/r"),
                        instances=[{"id": "i-1", "state": "noticed", "busy": True, "up_s": 30.0, "deadline_s": 7.5}],
                        jobs=[{"name": "tiny-0", "state": "running", "step": 30, "max_steps": 60, "attempts": 1,
                               "preemptions": 0}],
                        disruptions={"notice": 1, "rebalance": 1}, cost_spot_usd=0.0012, cost_on_demand_usd=0.0034,
                        spot_price=0.21)
    text = render(live(snapshot))
    for expected in ("running the jobs", "i-1", "noticed", "8 s", "tiny-0", "30/60", "notices 1", "rebalance 1",
                     "hard kills 0", "spot $0.0012", "$0.210/h", "on-demand $0.0034"):
        assert expected in text, expected


def test_the_summary_says_what_was_proven_and_where_the_files_are() -> None:
    result = {**a_result(), "instances_launched": 3, "instance_seconds": 120.0, "instance_type": "g4dn.xlarge",
              "directory": "/tmp/r", "png": "/tmp/r/rehearsal.png"}
    text = render(summary(result))
    for expected in ("yes (bitwise)", "1 done, 1 failed", "1 notices", "1 hard kills", "lost steps 7",
                     "0 -> 2 -> 0", "67 % less", "files: /tmp/r"):
        assert expected in text, expected
