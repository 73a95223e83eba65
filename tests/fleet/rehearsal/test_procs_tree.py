"""A hard kill ends a child's whole tree, even a descendant that started a session of its own
(torch's elastic agent starts every worker so): the rehearsal's processes carry a tag that the
kill follows, where `killpg` alone would leave such a worker training on."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from mamba_training.fleet.rehearsal.procs import Processes, group_alive, port_free, tagged

# A parent that starts a grandchild in a new session (as torch's SubprocessHandler does), writes
# the grandchild's pid, and waits.
TREE = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
open(sys.argv[1], "w").write(str(grandchild.pid))
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_tree(processes: Processes, tmp_path: Path, name: str) -> int:
    pid_file = tmp_path / f"{name}.pid"
    processes.start(name, [sys.executable, "-c", TREE, str(pid_file)], dict(os.environ))
    deadline = time.monotonic() + 120
    while not pid_file.is_file() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the tree never started its grandchild"
        time.sleep(0.05)
    return int(pid_file.read_text())


def test_kill_ends_a_descendant_in_its_own_session(processes: Processes, tmp_path: Path) -> None:
    grandchild = _start_tree(processes, tmp_path, "tree")
    child = processes.children[-1]
    assert os.getpgid(grandchild) != child.pid  # out of reach of killpg
    assert grandchild in tagged(child.tag)
    child.kill()
    assert not group_alive(child.pid)
    assert not _alive(grandchild)
    assert not child.anything_alive()


def test_stop_all_ends_every_tagged_process_and_nothing_else(processes: Processes, tmp_path: Path) -> None:
    first = _start_tree(processes, tmp_path, "one")
    second = _start_tree(processes, tmp_path, "two")
    other = Processes(tmp_path / "other")  # another rehearsal's registry: its own tag prefix
    bystander = _start_tree(other, tmp_path, "bystander")
    try:
        assert set(tagged(processes.tag_prefix)) >= {first, second}
        assert bystander not in tagged(processes.tag_prefix)
        processes.stop_all(timeout=2)
        assert tagged(processes.tag_prefix) == []
        assert _alive(bystander)
    finally:
        other.stop_all(timeout=2)
    assert not _alive(bystander)


def test_a_port_is_free_once_its_listener_is_gone_even_with_connections_in_time_wait() -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as HTTP servers (moto's) do
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    assert not port_free(port)  # listening: in use
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end of the connection goes to TIME_WAIT
    client.recv(1)  # the close has arrived
    client.close()
    server.close()
    assert port_free(port)
