"""The save buffer allocated ahead: after restore() and the next optimizer step, the manager allocates
the serialization buffer in the background, so the first save of a new process does not pay for
page faults while training waits. Saves through that larger buffer restore bit for bit."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mamba_training.checkpoint import CheckpointManager, CheckpointPolicy
from mamba_training.checkpoint.state import snapshot
from tests.checkpoint.tiny import build, same, train, weights


def wait_for_buffer(mgr: CheckpointManager, timeout: float = 30) -> torch.Tensor:
    deadline = time.monotonic() + timeout
    while "tensors" not in mgr._buffers:
        assert time.monotonic() < deadline, "the buffer was never allocated ahead"
        time.sleep(0.01)
    return mgr._buffers["tensors"]


def test_buffer_allocated_after_the_first_step_is_used_by_the_first_save(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    state = build(width=64)
    mgr = CheckpointManager(url, policy=CheckpointPolicy(keep_last=3), cache_dir=tmp_path / "c")
    assert mgr.restore(state) is None  # an empty store: a new run
    assert "tensors" not in mgr._buffers  # nothing before AdamW has its moments
    train(state, 1)
    ahead = wait_for_buffer(mgr)
    mgr.save(1, 4, state)
    train(state, 2)  # the optimizer waits for the copy out of the live tensors
    commit = mgr.flush()
    assert mgr._buffers["tensors"].data_ptr() == ahead.data_ptr()  # no second allocation
    assert ahead.numel() > commit.bytes  # the estimate leaves room; the file is a view of its start
    expected = build(width=64)
    train(expected, 1)
    fresh = build(width=64)
    assert CheckpointManager(url, cache_dir=tmp_path / "r").restore(fresh).step == 1
    assert same(weights(fresh), weights(expected))


def test_a_buffer_too_small_is_not_reused() -> None:
    snap = snapshot(build())
    small = torch.zeros(16, dtype=torch.uint8)
    out = snap.serialize(small)
    assert out.data_ptr() != small.data_ptr() and out.numel() > 16 and int(small.sum()) == 0


EXIT_RIGHT_AFTER_THE_FIRST_STEP = """
import sys, tempfile
sys.path.insert(0, sys.argv[1])
from tests.checkpoint.tiny import build, train
from mamba_training.checkpoint import CheckpointManager
state = build(width=3_000_000)  # a ~430 MB buffer: still being touched when the process exits
with tempfile.TemporaryDirectory() as tmp:
    CheckpointManager(tmp + "/run", cache_dir=tmp + "/c").restore(state)
    train(state, 1)
sys.exit(75)
"""


def test_exiting_while_the_buffer_is_allocated_keeps_the_exit_code() -> None:
    """A daemon thread inside a torch op at interpreter exit aborts the process (SIGABRT): the
    preempted exit code 75 would be lost. The allocation stops at exit."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", EXIT_RIGHT_AFTER_THE_FIRST_STEP, str(repo)], capture_output=True,
                            text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 75, result.stderr[-2000:]
