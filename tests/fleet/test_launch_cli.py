"""`launch` and `coordinator` on bad input: one line naming the culprit and the exit code; a node
that cannot join leaves the waiting node alone. Real processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each case starts the CLI (and torch) in a process of its own

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def mamba(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mamba_training", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert proc.poll() is None, f"exited {proc.returncode}: {path.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {path}"
        time.sleep(0.05)


@pytest.mark.parametrize("args, code, culprit", [
    (["--nnodes", "3:2"], 2, "--nnodes '3:2': MIN 3 is larger than MAX 2"),
    (["--nnodes", "one:two"], 2, "--nnodes 'one:two'"),
    (["--nnodes", "1:2", "--", "--set", "train.no_such_key=1"], 2, "train.no_such_key"),
    (["--nnodes", "1:2", "--connect-timeout", "1"], 1, "does not answer"),
    (["--nnodes", "1:3", "--", "--set", "train.batch_size=12", "--set", "train.micro_batch_size=4"], 2,
     "train.batch_size 12 must split evenly over every world size of --nnodes 1:3 x 1 processes into "
     "train.micro_batch_size 4 per rank; it does not for 2"),
])
def test_launch_bad_input_is_one_line_and_an_exit_code(args: list[str], code: int, culprit: str) -> None:
    port = free_port()  # nothing listens there
    result = mamba("launch", "--coordinator", f"127.0.0.1:{port}", *args)
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and culprit in lines[0], result.stderr


def test_coordinator_on_a_taken_port_says_so() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = mamba("coordinator", "--port", str(taken.getsockname()[1]))
    assert result.returncode == 1 and "cannot serve the coordinator" in result.stderr


def test_a_node_with_another_process_count_is_refused_and_the_waiting_node_stays(tmp_path: Path) -> None:
    port = free_port()
    coordinator_log = tmp_path / "coordinator.log"
    coordinator = subprocess.Popen([sys.executable, "-m", "mamba_training", "coordinator", "--port", str(port)],
                                   env=ENV, stderr=coordinator_log.open("w"))
    node_log = tmp_path / "node.log"
    node = None
    try:
        wait_for_text(coordinator_log, "listening", coordinator)
        store = ["--set", f"checkpoint.store={tmp_path / 'run'}"]
        node = subprocess.Popen([sys.executable, "-m", "mamba_training", "launch", "--coordinator",
                                 f"127.0.0.1:{port}", "--nnodes", "2:2", "--", *store],
                                env=ENV, stdout=node_log.open("w"), stderr=subprocess.STDOUT)
        wait_for_text(node_log, "waiting for 2 nodes", node)
        other = mamba("launch", "--coordinator", f"127.0.0.1:{port}", "--nnodes", "2:2",
                      "--nproc-per-node", "2", "--", *store)
        assert other.returncode == 1
        assert "--nproc-per-node 2 does not match" in other.stderr
        assert node.poll() is None  # still waiting in the rendezvous
        node.send_signal(signal.SIGTERM)  # systemd stopping a node that never trained: it leaves
        assert node.wait(timeout=120) == 75
    finally:
        if node is not None and node.poll() is None:
            node.kill()
            node.wait()
        coordinator.terminate()
        coordinator.wait(timeout=60)
