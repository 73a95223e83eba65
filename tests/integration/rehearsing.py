"""Running `mamba-training rehearse` as users do, and checking it left nothing behind; shared by
the rehearsal tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mamba_training.fleet.rehearsal.procs import group_alive, tagged


def rehearse(*args: str, cwd: Path, env: dict[str, str] | None = None,
             timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the command; past `timeout` it gets Ctrl-C (its own teardown ends what it started), then fails."""
    command = [sys.executable, "-m", "mamba_training", "rehearse", *args]
    proc = subprocess.Popen(command, cwd=cwd, env=env or os.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        pytest.fail(f"rehearse did not finish within {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def started_pids(directory: Path) -> list[int]:
    pids = directory / "procs" / "pids"
    return [int(line.split()[0]) for line in pids.read_text().splitlines()] if pids.exists() else []


def assert_nothing_left(directory: Path) -> None:
    """No process group it recorded, and no process carrying its tag (torch's elastic workers run
    in sessions of their own, out of reach of the groups), is still running."""
    pids = started_pids(directory)
    assert pids, "the rehearsal recorded no processes"
    assert [pid for pid in pids if group_alive(pid)] == []
    assert tagged(f"{(directory / 'procs').resolve()}:") == []
