"""The coordinator: a standalone TCPStore that every node's elastic agent joins as a client.

It holds only rendezvous state (who is in the current round) and each run's node shape, never
training state, so losing it costs a run at most a restart from its last committed checkpoint
(docs/design.md, "Multi-node training"). One coordinator serves many runs: keys are prefixed by
run id (the c10d rendezvous does that itself).
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from datetime import timedelta

from mamba_training.errors import MambaTrainingError, UsageError


class CoordinatorError(MambaTrainingError):
    """The coordinator cannot be served or reached, or a node does not fit the run."""


def serve(host: str, port: int, ready: "callable | None" = None) -> None:
    """Serve the store on host:port until SIGTERM or SIGINT."""
    from torch.distributed import TCPStore

    if not 0 <= port < 65536:
        raise UsageError(f"--port {port}: expected 0..65535")
    try:
        store = TCPStore(host, port, is_master=True, multi_tenant=True, wait_for_workers=False,
                         timeout=timedelta(seconds=30))
    except (RuntimeError, OSError) as error:
        raise CoordinatorError(f"cannot serve the coordinator on {host}:{port}: {error}") from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if ready is not None:
        ready(store.port)
    stop.wait()


def wait_reachable(host: str, port: int, timeout_s: float) -> None:
    """Return once a TCP connection to the coordinator succeeds; raise after `timeout_s`.

    Refusals are retried: nodes and the coordinator boot in any order.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())):
                return
        except OSError as error:
            if time.monotonic() + 0.5 >= deadline:
                raise CoordinatorError(
                    f"coordinator {host}:{port} does not answer ({error.strerror or error})") from None
            time.sleep(0.5)


def claim_node_shape(host: str, port: int, run_id: str, nproc_per_node: int, timeout_s: float) -> None:
    """Record this run's processes per node, or check it: torchrun needs homogeneous nodes.

    The first node of a run sets the value; a node with another value is refused here, before it
    enters the rendezvous, so it never disturbs the nodes already training.
    """
    from torch.distributed import TCPStore

    try:
        store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
        key = f"mamba-training/{run_id}/nproc_per_node"
        agreed = store.compare_set(key, "", str(nproc_per_node)).decode()
    except (RuntimeError, OSError) as error:
        raise CoordinatorError(f"coordinator {host}:{port} does not answer ({error})") from None
    if agreed != str(nproc_per_node):
        raise CoordinatorError(
            f"--nproc-per-node {nproc_per_node} does not match run {run_id!r}, whose nodes run {agreed} "
            "processes each (every node of a run needs the same GPU count)")
