"""`launch`: run one node of a multi-node run under torch's elastic agent (c10d rendezvous).

Each node runs a `LocalElasticAgent` that meets the others at the coordinator's standalone
TCPStore (`is_host=false`), starts `nproc_per_node` trainer processes, and restarts them into a
new rendezvous round whenever membership changes: a worker exiting non-zero (a peer left or
died) or a node waiting to join. The trainer resumes from the newest committed checkpoint on
every start, so a restart costs a process start plus a checkpoint load, not training steps.

A node leaves for good when one of its workers writes the leaving marker into the directory
named by MAMBA_TRAINING_NODE_DIR (after the run's checkpoint is committed), or when the
launcher itself gets SIGTERM/SIGINT. It then ends its agent through the agent's signal path,
which stops the workers but does not close the rendezvous (torch's launcher closes it only on
a normal return or a failure), and exits 75. docs/design.md, "Multi-node training", has the
whole protocol and the measurements behind the timeouts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mamba_training.config import Config, accumulation_steps, load_config
from mamba_training.errors import EXIT_USAGE, ConfigError
from mamba_training.fleet.coordinator import claim_node_shape, wait_reachable
from mamba_training.fleet.nodes import LEAVING_MARKER, NODE_DIR_ENV, NodeRange, Outcome, node_exit_code

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchSpec:
    coordinator: tuple[str, int]
    nnodes: NodeRange
    nproc_per_node: int
    run_id: str
    train_args: tuple[str, ...]
    max_restarts: int = 100  # every re-form after a peer leaves counts as one
    last_call_s: int = 2  # how long a completing round waits for latecomers
    keep_alive_s: int = 1  # heartbeat period; a node silent for 5 of them is dead
    join_timeout_s: int = 600
    shutdown_timeout_s: int = 50  # SIGTERM -> SIGKILL for workers: covers an emergency flush
    connect_timeout_s: float = 30.0  # nodes and the coordinator boot in any order


def check_train_options(train_args: list[str]) -> Config:
    """Load the run's config from the train options now: a bad config fails here with exit 2,
    not later as a worker exit 2 that the agent would restart over and over."""
    config, overrides, args = None, [], list(train_args)
    while args:
        flag = args.pop(0)
        name, eq, inline = flag.partition("=")
        if name in ("--config", "-c", "--set", "-s"):
            value = inline if eq else (args.pop(0) if args else "")
            if name in ("--config", "-c"):
                config = Path(value)
            else:
                overrides.append(value)
    return load_config(config, overrides)


def check_batch_fits(config: Config, nnodes: NodeRange, nproc_per_node: int) -> None:
    """The global batch splits evenly over the ranks, into whole micro-batches, at every world
    size the run can take: a bad --nnodes range fails here, not as worker exits 2 later."""
    train = config.train
    sizes = [n * nproc_per_node for n in range(nnodes.low, nnodes.high + 1)]
    bad = []
    for world in sizes:
        try:
            accumulation_steps(train, world)
        except ConfigError:
            bad.append(world)
    if not bad:
        return
    if train.micro_batch_size is not None:
        split = f"into train.micro_batch_size {train.micro_batch_size} per rank"
    else:
        split = f"(x train.grad_accum {train.grad_accum})"
    raise ConfigError(
        f"train.batch_size {train.batch_size} must split evenly over every world size of --nnodes "
        f"{nnodes.low}:{nnodes.high} x {nproc_per_node} processes {split}; it does not for "
        f"{', '.join(map(str, bad))}")


def default_run_id(config: Config) -> str:
    """The rendezvous name of a run: its store URL, made safe for a store key."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", config.checkpoint.store).strip("-") or "run"


def run_node(spec: LaunchSpec) -> int:
    """Run this node until the run ends, the node leaves, or it fails; return its exit code."""
    host, port = spec.coordinator
    wait_reachable(host, port, spec.connect_timeout_s)
    claim_node_shape(host, port, spec.run_id, spec.nproc_per_node, spec.connect_timeout_s)
    node_dir = Path(tempfile.mkdtemp(prefix="mamba-node-"))
    os.environ[NODE_DIR_ENV] = str(node_dir)
    # Each round's rank 0 worker hosts the process group's store itself. torch shares the
    # agent's store otherwise, and a survivor that changes rank between rounds keeps an address
    # from the old round (the rebuild only covers "became rank 0").
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    _leave_on_signals()
    watcher = _LeaveWatcher(node_dir / LEAVING_MARKER)
    watcher.start()
    log.info("waiting for %d nodes (up to %d) at %s:%d, run %s", spec.nnodes.low, spec.nnodes.high, host, port,
             spec.run_id)
    try:
        outcome, codes = _run_agent(spec)
    finally:
        watcher.stop()
        shutil.rmtree(node_dir, ignore_errors=True)
    if watcher.fired:
        outcome = Outcome.LEFT
    return node_exit_code(outcome, codes)


def _run_agent(spec: LaunchSpec) -> tuple[Outcome, tuple[int, ...]]:
    from torch.distributed.elastic.agent.server.api import WorkerSpec
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    host, port = spec.coordinator
    params = RendezvousParameters(
        backend="c10d", endpoint=f"{host}:{port}", run_id=spec.run_id,
        min_nodes=spec.nnodes.low, max_nodes=spec.nnodes.high,
        is_host="false", join_timeout=str(spec.join_timeout_s),
        last_call_timeout=str(spec.last_call_s), keep_alive_interval=str(spec.keep_alive_s),
        keep_alive_max_attempt="5",
    )
    handler = get_rendezvous_handler(params)
    worker_spec = WorkerSpec(
        role="trainer", local_world_size=spec.nproc_per_node, entrypoint=sys.executable,
        args=("-m", "mamba_training", "train", *spec.train_args), rdzv_handler=handler,
        max_restarts=spec.max_restarts, monitor_interval=0.1,
    )
    agent = _NodeAgent(worker_spec, logs_specs=DefaultLogsSpecs(log_dir=os.devnull),
                       shutdown_timeout=spec.shutdown_timeout_s, start_method="spawn")
    try:
        result = agent.run()
    except SignalException:
        _leave_round(handler)  # the agent stopped its workers; the rendezvous stays open for the rest
        return Outcome.LEFT, ()
    except (RendezvousError, RuntimeError) as error:  # the store's errors are RuntimeErrors
        log.error("rendezvous at %s:%d failed: %s", host, port, error)
        return Outcome.RENDEZVOUS_FAILED, ()
    if result.is_failed():
        handler.shutdown()
        return Outcome.WORKERS_FAILED, tuple(f.exitcode for f in result.failures.values())
    handler.shutdown()  # the run is over for every node: close the rendezvous
    return Outcome.SUCCEEDED, ()


def _leave_round(handler) -> None:  # noqa: ANN001 - torch's DynamicRendezvousHandler
    """Take this node out of the current round's participants, as the survivors do on restart.

    Without it the survivors' next round waits until this node's heartbeat expires (5 keep-alive
    periods). It uses torch 2.13's private exit operation; if that is gone the expiry still
    covers it, only slower.
    """
    try:
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _RendezvousExitOp

        handler._stop_heartbeats()
        handler._op_executor.run(_RendezvousExitOp(), time.monotonic() + 10)
    except Exception as error:  # leaving early is an optimisation; never fail the exit over it
        log.warning("could not leave the rendezvous round early (%s); peers notice in 5 keep-alives", error)


def _leave_on_signals() -> None:
    """SIGTERM/SIGINT end the agent through its signal path even before workers start.

    torch installs the same handler only when it starts the workers; until then a SIGTERM
    during the rendezvous would kill the launcher without an exit code of ours.
    """
    from torch.distributed.elastic.multiprocessing.api import _terminate_process_handler

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _terminate_process_handler)


def _node_agent_class():
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class NodeAgent(LocalElasticAgent):
        """torch's agent, but a restart gives workers the full shutdown timeout to flush.

        torch 2.13's `_stop_workers` calls `_shutdown()` with its default 30 s, not the
        configured `shutdown_timeout`; a worker checkpointing on SIGTERM would be SIGKILLed.
        """

        def _stop_workers(self, worker_group) -> None:  # noqa: ANN001 - torch's signature
            self._shutdown(timeout=self._shutdown_timeout)

        def _monitor_workers(self, worker_group):  # noqa: ANN001, ANN202
            result = super()._monitor_workers(worker_group)
            if result.is_failed() and any(f.exitcode == EXIT_USAGE for f in result.failures.values()):
                self._remaining_restarts = 0  # a bad config fails the same way on every restart
            return result

        def _rendezvous(self, worker_group) -> None:  # noqa: ANN001
            super()._rendezvous(worker_group)
            log.info("node joined the run as group rank %d of %d nodes (restart %d)", worker_group.group_rank,
                     worker_group.group_world_size, worker_group.spec.max_restarts - self._remaining_restarts)

    return NodeAgent


def _NodeAgent(*args, **kwargs):  # noqa: N802 - a class made lazily so torch imports late
    return _node_agent_class()(*args, **kwargs)


class _LeaveWatcher:
    """Turns the leaving marker into SIGTERM for this process: the agent's safe way out."""

    def __init__(self, marker: Path, poll_s: float = 0.1) -> None:
        self._marker = marker
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="leave-watcher", daemon=True)
        self.fired = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            if self._marker.exists():
                self.fired = True
                log.info("a worker marked this node as leaving: stopping the agent, rendezvous left open")
                os.kill(os.getpid(), signal.SIGTERM)
                return
