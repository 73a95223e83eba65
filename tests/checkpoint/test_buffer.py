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


EXIT_WHILE_THE_BUFFER_IS_ALLOCATED = """
import atexit, sys, tempfile, threading
sys.path[:0] = [sys.argv[1] + "/src", sys.argv[1]]  # this checkout's code
from tests.checkpoint.tiny import build, train
from mamba_training.checkpoint import manager as engine


class Gate(threading.Event):
    # The prewarm loop's stop flag, checked between 64 MiB slices: after the first slice it holds
    # the loop until the process is exiting, so the exit lands mid-allocation on any machine.

    def __init__(self):
        super().__init__()
        self.checks = 0
        self.touching, self.release = threading.Event(), threading.Event()

    def is_set(self):
        self.checks += 1
        if self.checks == 2:
            self.touching.set()
            self.release.wait()
        return super().is_set()

    def set(self):
        self.release.set()
        super().set()


gate = engine._STOP_PREWARMS = Gate()
state = build(width=3_000_000)  # a ~430 MB buffer: seven slices
tmp = tempfile.mkdtemp()
mgr = engine.CheckpointManager(tmp + "/run", cache_dir=tmp + "/c")
mgr.restore(state)
train(state, 1)  # the step's post-hook starts the allocation
assert gate.touching.wait(60), "the allocation never started"


@atexit.register  # registered after the manager's handler, so it runs first (atexit is LIFO)
def resume_the_allocation():
    print(f"at exit: allocating={mgr._prewarm_thread.is_alive()} done={'tensors' in mgr._buffers}", flush=True)
    gate.release.set()  # the loop goes on touching pages (torch ops) as the interpreter shuts down


sys.exit(75)
"""


def test_exiting_while_the_buffer_is_allocated_keeps_the_exit_code(tmp_path: Path) -> None:
    """A daemon thread inside a torch op at interpreter exit aborts the process (SIGABRT): the
    preempted exit code 75 would be lost. The allocation stops at exit. The child holds the
    allocation after its first slice until it is exiting, so the exit is mid-allocation always."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", EXIT_WHILE_THE_BUFFER_IS_ALLOCATED, str(repo)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)})
    assert "at exit: allocating=True done=False" in result.stdout, (result.stdout, result.stderr[-2000:])
    assert result.returncode == 75, result.stderr[-2000:]
