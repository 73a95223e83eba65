"""SIGKILL at drawn moments of a process that saves every step: 20 trials (bench/kill_trials.py runs
hundreds). Kill moments come from a fixed seed and the child's own progress (a drawn number of
commits, then a drawn delay), so what the test asserts does not depend on the machine's speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SEED = 20261201


def test_sigkill_during_saves_never_leaves_latest_unreadable_or_loses_a_commit(tmp_path: Path) -> None:
    print(f"kill trials seed {SEED}")
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "checkpoint" / "kill_trials.py"), "--trials", "20",
         "--steps", "25", "--max-delay", "0.3", "--seed", str(SEED), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["problems"] == [] and report["seed"] == SEED
    assert report["trials"] == 20 and report["kills"] + report["exited_before_kill"] == 20
    assert report["mid_save_kills"] <= report["kills"] and report["restore_kills"] <= report["kills"]
    # Every trial that waited for a commit found one to restore and checked it bit for bit against
    # the reference training. With this seed 14 trials wait for at least one commit, and the first
    # twelve wait for 11 in all (each trial resumes where the last one was killed).
    assert report["restore_checks"] >= report["trials_after_a_commit"] >= 14
    assert max(report["latest_steps"]) >= 11
