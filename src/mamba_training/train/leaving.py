"""How a trainer under `mamba-training launch` tells its node's launcher "this node leaves".

The launcher (fleet/launch.py) gives every worker a per-launch directory in
MAMBA_TRAINING_NODE_DIR. A worker whose stop came from its own instance (a spot notice, an Auto
Scaling termination) writes the leaving marker there once the run's checkpoint is committed, and
then waits: the launcher ends its elastic agent through the signal path, which stops the workers
without closing the rendezvous, so the other nodes re-form without this one. A worker that
exited instead would race the agent into restarting it. No torch here: the launcher imports it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

NODE_DIR_ENV = "MAMBA_TRAINING_NODE_DIR"
LEAVING_MARKER = "leaving"
# Stop reasons that mean "this instance goes away"; a SIGTERM alone does not (the agent sends one
# to every worker when it restarts them for a joiner, and a stopped launcher knows it by itself).
NODE_LEAVING_REASONS = ("interruption:", "lifecycle:")


def node_is_leaving(reason: str) -> bool:
    return reason.startswith(NODE_LEAVING_REASONS)


def node_leaves(views: list[tuple[int, bool]], node: int) -> bool:
    """Whether `node` leaves, from every rank's (node, own cause means leaving): only local rank 0
    watches the instance, so its siblings learn it here."""
    return any(n == node and leaves for n, leaves in views)


def mark_and_wait(reason: str, wait_s: float) -> bool:
    """Under a launcher: write the marker, then wait up to `wait_s` for the launcher's SIGTERM
    (which ends this process). False when no launcher asked for markers."""
    node_dir = os.environ.get(NODE_DIR_ENV)
    if not node_dir:
        return False
    marker = Path(node_dir) / LEAVING_MARKER
    partial = marker.with_name(f".{LEAVING_MARKER}.{os.getpid()}")
    partial.write_text(f"{reason}\n")
    partial.replace(marker)  # atomic: the launcher never sees half a marker
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
    return True
