"""Processes a rehearsal starts: each in a process group of its own, recorded, ended by its PID.

Every child is started with `start_new_session=True`, so its PID is also its process group id
and everything it starts in turn (an agent's trainer, torchrun's workers) can be ended with one
`killpg` — and nothing outside the groups we created is ever signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from mamba_training.errors import MambaTrainingError, UsageError


class RehearsalError(MambaTrainingError):
    """A rehearsal could not start or run (a tool missing, a server that did not come up)."""


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def require_port(port: int, flag: str) -> None:
    if not 0 <= port <= 65535:
        raise UsageError(f"{flag} {port}: expected 0..65535")
    if port and not port_free(port):
        raise UsageError(f"{flag} {port}: port {port} on 127.0.0.1 is in use")


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` still runs (zombies waiting for their reaper do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: a zombie counts as alive here
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Child:
    """One started process (and its group); `log` holds its stdout and stderr."""

    name: str
    proc: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM to the group, SIGKILL after `timeout`; the group is gone when this returns."""
        if self.alive():
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL to the whole group (also reaps the leader): a hard kill, or the end of stop()."""
        self.signal_group(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            pass
        deadline = time.monotonic() + 10
        while group_alive(self.proc.pid) and time.monotonic() < deadline:  # members die a moment later
            time.sleep(0.01)

    def tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Processes:
    """The registry of everything a rehearsal started; `stop_all` ends them, newest first."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.children: list[Child] = []
        directory.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path | None = None) -> Child:
        log = self.directory / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=cwd, start_new_session=True)
        child = Child(name, proc, log)
        self.children.append(child)
        with open(self.directory / "pids", "a") as pids:  # what to look for if anything is ever left
            pids.write(f"{proc.pid} {name}\n")
        return child

    def stop_all(self, timeout: float = 10.0) -> None:
        alive = [c for c in reversed(self.children) if c.alive()]
        for child in alive:  # all get SIGTERM at once: the shutdown takes one timeout, not n
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in alive:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:
            child.kill()  # also ends grandchildren whose leader already exited

    def running(self) -> list[Child]:
        return [c for c in self.children if c.alive()]


def wait_until(condition, timeout: float, what: str, interval: float = 0.1, child: Child | None = None) -> None:
    """Poll `condition` until true; a dead `child` or the timeout is a RehearsalError naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if child is not None and not child.alive():
            raise RehearsalError(f"{what}: {child.name} exited {child.proc.returncode} "
                                 f"(log {child.log}): {child.tail(300).strip().splitlines()[-1:] or ''}")
        if time.monotonic() > deadline:
            raise RehearsalError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


__all__ = ["Child", "Processes", "RehearsalError", "free_port", "group_alive", "port_free", "require_port", "wait_until"]
