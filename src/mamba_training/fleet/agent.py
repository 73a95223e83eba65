"""The agent: what the systemd service runs on every instance. It takes one job at a time from the
queue, leases it in the jobs store, runs it as a `mamba-training train` subprocess, renews the lease
while it runs, and records the outcome (fleet/policy.py decides what an exit code means).

Its own instance being reclaimed (spot notice, lifecycle Terminated) or a SIGTERM: the trainer
child commits its emergency checkpoint and exits 75 (it runs its own watcher on the same IMDS);
the agent returns the job to the queue, completes the termination lifecycle action if there was
one, and raises `Preempted` (exit 75). Idle for `idle_seconds` in an auto scaling group: scale-in
protection off, then TerminateInstanceInAutoScalingGroup with decrement.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from mamba_training.aws import fleet as asg
from mamba_training.aws.queue import Message, Queue
from mamba_training.checkpoint.protocol import read_latest
from mamba_training.checkpoint.store import open_store
from mamba_training.errors import MambaTrainingError, Preempted
from mamba_training.fleet import policy
from mamba_training.fleet.jobs import JobsStore, JobSpec, JobState, LeaseLost
from mamba_training.spot.watcher import Interruption, LifecycleTerminating, make_watcher

log = logging.getLogger(__name__)


@dataclass
class AgentOptions:
    queue_url: str
    store_url: str
    imds_url: str = "auto"
    workdir: Path = field(default_factory=lambda: Path(".mamba-agent"))
    lease_seconds: float = 300.0  # renewed every third of it
    idle_seconds: float = 600.0
    exit_when_idle: bool = False
    wait_seconds: int = 20  # SQS long poll
    visibility_seconds: int = 60  # only while a message is being claimed
    tick_seconds: float = 0.5
    imds_poll_seconds: float = 5.0
    coordinator: str | None = None  # HOST:PORT for multi-node jobs (MAMBA_COORDINATOR)
    nproc_per_node: int | None = None  # trainer processes per node; None: one per GPU (nvidia-smi), else 1
    python: str = field(default_factory=lambda: sys.executable)


def training_command(python: str, spec_file: Path, spec: JobSpec, imds_url: str, cache_dir: Path,
                     coordinator: str | None = None, nproc_per_node: int = 1) -> list[str]:
    """The command line of one run of a job. One node: `train` (under `torchrun --standalone` for
    several GPUs); more: `launch`, one per node, meeting at the coordinator (docs/jobs.md)."""
    sets = [f"checkpoint.store={spec.run_store}", f"checkpoint.cache_dir={cache_dir}", f"spot.imds_url={imds_url}"]
    train_options = ["-c", str(spec_file), *[a for s in sets for a in ("--set", s)], "--quiet"]
    if spec.nodes == 1 and nproc_per_node == 1:
        return [python, "-m", "mamba_training", "train", *train_options]
    if spec.nodes == 1:
        return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
                "-m", "mamba_training", "train", *train_options]
    if not coordinator:
        raise MambaTrainingError(f"job {spec.id} needs {spec.nodes} nodes but no coordinator is set "
                                 "(--coordinator or MAMBA_COORDINATOR)")
    return [python, "-m", "mamba_training", "launch", "--coordinator", coordinator,
            "--nnodes", f"{spec.nodes}:{spec.nodes}", "--nproc-per-node", str(nproc_per_node), "--run-id", spec.id,
            "--", *train_options]


def gpu_count() -> int:
    """GPUs on this machine by `nvidia-smi -L` (no torch import in the agent); 0 without a driver."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU ")) if listed.returncode == 0 else 0


class Agent:
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.jobs = JobsStore(options.store_url)
        self.queue = Queue(options.queue_url)
        self.watcher = make_watcher(options.imds_url, options.imds_poll_seconds)
        self.instance_id: str | None = None
        self.group: str | None = None
        self.holder = f"{socket.gethostname()}/{os.getpid()}"
        self._stop = threading.Event()  # SIGTERM
        self._reclaim: Interruption | LifecycleTerminating | None = None
        self._child_preempted = False  # a run exited 75 without being told to
        self._slot = 0  # the node slot of the job being run (0 for single-node jobs)
        self._etag = ""
        self._run_store = ""

    # ------------------------------------------------------------------ entry
    def run(self) -> str:
        """Serve jobs until idle (returns why) or reclaimed/stopped mid-job (raises Preempted)."""
        self.queue.check()
        self.options.workdir.mkdir(parents=True, exist_ok=True)
        previous = self._install_signals()
        try:
            if self.watcher is not None:
                self.watcher.start()
                self.instance_id = self.watcher.instance_info().get("instance_id")
            if self.instance_id:
                self.holder = f"{self.instance_id}/{os.getpid()}"
                self.group = self._quietly(lambda: asg.group_of_instance(self.instance_id), "finding my group")
            log.info("agent %s serving %s (group %s)", self.holder, self.queue.url, self.group or "none")
            return self._serve()
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _serve(self) -> str:
        idle_since = time.monotonic()
        while True:
            self._check_reclaim()
            if self._reclaim is not None:
                self._leave_reclaimed(None)
            if self._stop.is_set():
                return "stopped by SIGTERM while idle"
            try:
                taken = self._take()
            except MambaTrainingError as error:  # S3 or SQS hiccuped: the queue was fine at start
                log.warning("taking a job failed (%s); retrying", error)
                self._stop.wait(min(5.0, self.options.idle_seconds or 5.0))
                continue
            if taken is not None:
                self._run(*taken)
                idle_since = time.monotonic()
                continue
            action = policy.idle_action(time.monotonic() - idle_since, self.options.idle_seconds,
                                        self.group is not None, self.options.exit_when_idle)
            if action == "leave":
                self._quietly(lambda: asg.set_protection(self.group, self.instance_id, False), "dropping protection")
                if self._quietly(lambda: asg.leave_group(self.instance_id) or True, "leaving the group"):
                    return f"idle for {self.options.idle_seconds:g} s: left {self.group}"
                if self.options.exit_when_idle:
                    return "idle: could not leave the group; exiting"
                idle_since = time.monotonic()
            elif action == "exit":
                return f"idle for {self.options.idle_seconds:g} s"

    # ------------------------------------------------------------------ taking a job
    def _take(self) -> tuple[JobState, str] | None:
        if self.watcher is not None:  # a notice may have come since the watcher's last round
            self.watcher.check_once()
            self._check_reclaim()
        if self._reclaim is not None or self._stop.is_set():
            return None
        messages = self.queue.receive(10, self.options.wait_seconds, self.options.visibility_seconds)
        candidates: dict[str, tuple[JobState, Message]] = {}
        for message in messages:
            state = self._state_or_none(message.job_id)
            if state is None or not policy.wants_node(state) or state.id in candidates:
                self.queue.delete(message)  # finished, unknown, or a duplicate: nothing to run
                continue
            candidates[state.id] = (state, message)
        choice = policy.choose_job([s for s, _ in candidates.values()])
        for job_id, (_, message) in candidates.items():
            if choice is None or job_id != choice.id:
                self.queue.release(message)
        if choice is None:
            return None
        message = candidates[choice.id][1]
        claimed = self.jobs.claim_slot(choice.id, choice.nodes, self.holder, self.options.lease_seconds)
        if claimed is None:  # other agents hold it (every node slot of it)
            self.queue.delete(message)
            return None
        self._slot, etag = claimed
        if self._slot == 0:
            started = self.jobs.update(choice.id, lambda s: policy.start_run(s, self.holder, time.time()))
            ours = started.state == "running" and started.holder == self.holder
        else:  # a further node of a multi-node job: slot 0's agent owns the job's state
            started = self.jobs.state(choice.id)[0]
            ours = started.state in ("queued", "running") and not started.cancel_requested
        self.queue.delete(message)
        if not ours:  # cancelled or finished meanwhile
            self._release(choice.id, etag)
            return None
        if started.nodes > 1 and self.jobs.free_slots(started.id, started.nodes):
            self._quietly(lambda: self.queue.send(started.id), "asking for the job's next node")
        log.info("job %s: run %d, node slot %d of %d (attempt %d of %d)", started.id, started.runs, self._slot,
                 started.nodes, started.attempts, started.max_attempts)
        return started, etag

    def _state_or_none(self, job_id: str) -> JobState | None:
        if not job_id:
            return None
        try:
            return self.jobs.state(job_id)[0]
        except MambaTrainingError as error:
            log.warning("message for job %r dropped: %s", job_id, error)
            return None

    # ------------------------------------------------------------------ running it
    def _run(self, job: JobState, etag: str) -> None:
        spec = self.jobs.spec(job.id)
        self._run_store = spec.run_store
        folder = self.options.workdir / job.id
        folder.mkdir(parents=True, exist_ok=True)
        spec_file = folder / "config.yaml"
        spec_file.write_text(yaml.safe_dump(spec.config, sort_keys=False))
        command = training_command(self.options.python, spec_file, spec, self.options.imds_url,
                                   folder / "checkpoints", self.options.coordinator, self._nproc())
        log_path = folder / (f"run-{job.runs:03d}.log" if self._slot == 0 else f"run-{job.runs:03d}-node{self._slot}.log")
        if self.group:
            self._quietly(lambda: asg.set_protection(self.group, self.instance_id, True), "setting protection")
        with open(log_path, "wb") as out:
            child = subprocess.Popen(command, cwd=self.options.workdir, stdout=out, stderr=subprocess.STDOUT)
        code, lost, signalled = self._watch(job, child, etag)
        going_down = self._stop.is_set() or self._reclaim is not None
        if lost is None and policy.run_exit(code, going_down) != code:
            log.warning("job %s: its run died by signal %d while this instance was going down: counted as preempted",
                        job.id, -code)
            code = policy.run_exit(code, going_down)
        self._quietly(lambda: self.jobs.put_log(job.id, log_path.name, log_path.read_bytes()), "uploading the log")
        final = None
        if lost is None:
            final = self._finish(job.id, code)
        else:
            log.warning("job %s: %s; its run was stopped and the job left to its new holder", job.id, lost)
        if self.group:
            self._quietly(lambda: asg.set_protection(self.group, self.instance_id, False), "clearing protection")
        if code == policy.EXIT_PREEMPTED and not signalled:
            # The trainer stopped on its own IMDS watcher (it polls more often than we do): this
            # instance is going away, so take no other job; look once more for what it saw.
            self._child_preempted = True
            if self.watcher is not None:
                self.watcher.check_once()
            self._check_reclaim()
        if self._reclaim is not None or self._child_preempted or self._stop.is_set():
            self._leave_reclaimed(job.id, final.state if final is not None else "left to its new holder")

    def _nproc(self) -> int:
        if self.options.nproc_per_node is None:
            self.options.nproc_per_node = max(1, gpu_count())
        return self.options.nproc_per_node

    def _watch(self, job: JobState, child: subprocess.Popen, etag: str) -> tuple[int, str | None, bool]:
        """Wait for the child, renewing the lease: (exit code, None, whether we sent it SIGTERM), or
        (-9, why the lease was lost, ...)."""
        self._etag = etag
        expires = time.time() + self.options.lease_seconds
        renewed = time.monotonic()
        signalled = False
        while True:
            code = child.poll()
            if code is not None:
                return code, None, signalled
            if time.time() >= expires:
                # We were frozen past our own lease (SIGSTOP, a paused VM): another agent may run the
                # job already, so the child dies before anything else happens.
                child.kill()
                child.wait()
                return -9, self._after_expiry(job.id), signalled
            if time.monotonic() - renewed >= self.options.lease_seconds / 3:
                try:
                    self._etag = self.jobs.renew(job.id, self.holder, self._etag, self.options.lease_seconds,
                                                 slot=self._slot)
                    expires, renewed = time.time() + self.options.lease_seconds, time.monotonic()
                    state = self._refresh_step(job.id)
                    if state is not None and state.cancel_requested and not signalled:
                        log.info("job %s: cancel requested; stopping its run with a checkpoint", job.id)
                        child.send_signal(signal.SIGTERM)
                        signalled = True
                except LeaseLost as error:
                    child.kill()
                    child.wait()
                    return -9, str(error), signalled
                except MambaTrainingError as error:  # S3 or the network hiccuped: try again next tick
                    log.warning("job %s: lease renewal failed (%s); retrying", job.id, error)
            self._check_reclaim()
            if self._stop.is_set() and not signalled:
                child.send_signal(signal.SIGTERM)
                signalled = True
            self._stop.wait(self.options.tick_seconds)

    def _after_expiry(self, job_id: str) -> str:
        lease, current = self.jobs.lease(job_id, self._slot)
        if lease is not None and lease.holder == self.holder and current == self._etag:
            # Nobody took it while we were frozen: give the job back as if preempted.
            self._finish(job_id, policy.EXIT_PREEMPTED)
            return "lease expired while this agent was frozen; nobody had taken it, so it was returned"
        return "lease expired while this agent was frozen and another agent took the job"

    def _refresh_step(self, job_id: str) -> JobState | None:
        step = self._committed_step(job_id) if self._slot == 0 else None
        return self.jobs.update(job_id, lambda s: replace(s, step=step) if step is not None and s.step != step
                                and s.holder == self.holder else None)

    def _committed_step(self, job_id: str) -> int | None:
        try:
            pointer = read_latest(open_store(self._run_store))
        except MambaTrainingError:
            return None
        return pointer["step"] if pointer else None

    def _finish(self, job_id: str, code: int) -> JobState:
        step = self._committed_step(job_id)
        now = time.time()

        def outcome(state: JobState) -> JobState | None:
            if state.state != "running" or state.holder != self.holder:
                return None  # not ours any more
            ended = policy.node_exit(state, self._slot, code)
            return None if ended is None else replace(ended, step=step if step is not None else ended.step,
                                                      enqueued_at=now)

        final = self.jobs.update(job_id, outcome, now=now)
        log.info("job %s: node slot %d exited %d -> %s (%s)", job_id, self._slot, code, final.state, final.reason or "")
        self._release(job_id, self._etag)
        if (final.state == "queued" and final.holder is None) or policy.replacement_needed(final, self._slot, code):
            self._quietly(lambda: self.queue.send(job_id), f"re-enqueueing job {job_id}")
        return final

    def _release(self, job_id: str, etag: str) -> None:
        try:
            self.jobs.release(job_id, self.holder, etag, self._slot)
        except MambaTrainingError as error:
            log.warning("job %s: %s", job_id, error)

    # ------------------------------------------------------------------ reclaim and signals
    def _check_reclaim(self) -> None:
        if self.watcher is None or self._reclaim is not None:
            return
        for event in self.watcher.poll():
            if isinstance(event, (Interruption, LifecycleTerminating)):
                self._reclaim = event
                log.warning("instance %s is being reclaimed (%s)", self.instance_id, type(event).__name__)

    def _leave_reclaimed(self, job_id: str | None, job_state: str | None = None) -> None:
        if isinstance(self._reclaim, LifecycleTerminating) and self.group:
            self._quietly(lambda: asg.complete_termination(self.group, self.instance_id), "completing the lifecycle action")
        what = f"job {job_id} {job_state}" if job_id else "no job was running"
        why = "SIGTERM" if self._reclaim is None and not self._child_preempted else \
            f"instance {self.instance_id or 'here'} reclaimed"
        raise Preempted(f"agent stopped ({why}): {what}")

    def _install_signals(self) -> dict[int, object]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda *_: self._stop.set())
        return previous

    def _quietly(self, action, what: str):
        """AWS calls whose failure must not stop the agent (protection, lifecycle, logs)."""
        try:
            return action()
        except MambaTrainingError as error:
            log.warning("%s failed: %s", what, error)
            return None


def run_agent(options: AgentOptions) -> str:
    return Agent(options).run()


__all__ = ["Agent", "AgentOptions", "run_agent", "training_command"]
