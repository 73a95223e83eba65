"""Processes a rehearsal starts: each in a process group of its own, recorded, ended by its PID.

Every child is started with `start_new_session=True`, so its PID is also its process group id
and most of what it starts in turn (an agent's trainer) can be ended with one `killpg`. Not all:
torch's elastic agent (`launch`, `torchrun`) starts each worker in a session of its own, so a
SIGKILL of the group leaves the workers training on. Every child's environment therefore also
carries a tag, `MAMBA_REHEARSAL_PROC=<procs folder>:<name>`, that its descendants inherit, and a
kill ends the tagged processes too, like a machine's power-off ends everything on it. Nothing
outside the groups we created, or processes without our tag, is ever signalled.
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
    """Whether a server could listen on `port` now. SO_REUSEADDR as servers (moto's too) set it:
    the closed connections a stopped server leaves in TIME_WAIT do not hold its port."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


TAG = "MAMBA_REHEARSAL_PROC"


def tagged(tag: str) -> list[int]:
    """Live processes (zombies aside) whose environment holds `MAMBA_REHEARSAL_PROC=<tag>`, or,
    for a tag ending in ":", any tag with that prefix (a whole rehearsal's). Linux only: [] elsewhere."""
    wanted = f"{TAG}={tag}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            entries = environ.read_bytes().split(b"\0")
            state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # gone meanwhile, or another user's
        if state != "Z" and any(e == wanted or (wanted.endswith(b":") and e.startswith(wanted)) for e in entries):
            found.append(int(environ.parent.name))
    return found


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
    tag: str = ""
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
        """SIGKILL to the whole group and every process with its tag (also reaps the leader): a
        hard kill, or the end of stop()."""
        self.signal_group(signal.SIGKILL)
        self._kill_tagged()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
            pass
        deadline = time.monotonic() + 10
        while self.anything_alive() and time.monotonic() < deadline:  # members die a moment later
            self._kill_tagged()  # one forked just before the first sweep
            time.sleep(0.01)

    def anything_alive(self) -> bool:
        return group_alive(self.proc.pid) or bool(self.tag and tagged(self.tag))

    def _kill_tagged(self) -> None:
        for pid in tagged(self.tag) if self.tag else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

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
        self.tag_prefix = f"{directory.resolve()}:"  # every child's tag starts so: `tagged(prefix)` finds them all

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path | None = None) -> Child:
        log = self.directory / f"{name}.log"
        tag = f"{self.tag_prefix}{name}"
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**env, TAG: tag}, cwd=cwd, start_new_session=True)
        child = Child(name, proc, log, tag)
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


__all__ = ["Child", "Processes", "RehearsalError", "TAG", "free_port", "group_alive", "port_free", "require_port",
           "tagged", "wait_until"]
