"""SIGKILL at random moments of a process that saves every step: 20 trials (bench/kill_trials.py runs hundreds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_sigkill_during_saves_never_leaves_latest_unreadable_or_loses_a_commit(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "checkpoint" / "kill_trials.py"), "--trials", "20",
         "--steps", "25", "--max-delay", "0.5", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["problems"] == []
    assert report["trials"] == 20 and report["kills"] >= 18
    # The kills landed while the run made progress: most trials found a committed checkpoint to restore
    # and check bit for bit against the reference training.
    assert report["restore_checks"] >= 15 and max(report["latest_steps"]) >= 10
