"""Pure decisions of a node's launcher: parsing `--nnodes`, and the exit code a node ends with.

The exit code tells systemd (and the fleet agent) what happened to this node, not to the run:
75 means "this node left on purpose and its state is committed; resume elsewhere", so it is
never restarted in place; 1 means "this node failed" (systemd restarts it); 2 means bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mamba_training.errors import EXIT_PREEMPTED, EXIT_RUNTIME, EXIT_USAGE, UsageError
from mamba_training.train.leaving import LEAVING_MARKER, NODE_DIR_ENV  # the worker's side of it

__all__ = ["NODE_DIR_ENV", "LEAVING_MARKER", "NodeRange", "Outcome", "parse_nnodes", "parse_endpoint",
           "node_exit_code"]


@dataclass(frozen=True)
class NodeRange:
    """How many nodes a run may have: it starts at `low` and grows up to `high`."""

    low: int
    high: int


def parse_nnodes(text: str) -> NodeRange:
    """`MIN:MAX` or `N` (= `N:N`), positive integers with MIN <= MAX."""
    parts = text.split(":")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"--nnodes {text!r}: expected MIN:MAX or N with whole numbers, e.g. 1:4")
    low, high = int(parts[0]), int(parts[-1])
    if low < 1:
        raise UsageError(f"--nnodes {text!r}: MIN must be at least 1")
    if low > high:
        raise UsageError(f"--nnodes {text!r}: MIN {low} is larger than MAX {high}")
    return NodeRange(low, high)


def parse_endpoint(text: str) -> tuple[str, int]:
    """`HOST:PORT` of the coordinator."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--coordinator {text!r}: expected HOST:PORT, e.g. 10.0.0.5:29400")
    return host.strip("[]"), int(port)


class Outcome(Enum):
    """How the elastic agent of this node ended."""

    SUCCEEDED = "succeeded"  # every worker exited 0 and every node passed the exit barrier
    LEFT = "left"  # a worker marked this node as leaving, or the launcher got SIGTERM/SIGINT
    WORKERS_FAILED = "workers_failed"  # workers kept failing until max_restarts ran out
    RENDEZVOUS_FAILED = "rendezvous_failed"  # the coordinator vanished or the join timed out


def node_exit_code(outcome: Outcome, worker_exit_codes: tuple[int, ...] = ()) -> int:
    """The launcher's exit code for how its agent ended."""
    if outcome is Outcome.SUCCEEDED:
        return 0
    if outcome is Outcome.LEFT:
        return EXIT_PREEMPTED
    if outcome is Outcome.WORKERS_FAILED and EXIT_USAGE in worker_exit_codes:
        return EXIT_USAGE  # a bad config fails the same way on every restart
    return EXIT_RUNTIME
