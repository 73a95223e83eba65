"""Jobs end to end: the moto server over HTTP, agents as local processes (one IMDS emulator each,
serving the instance id moto gave the "instance"), the reconciler as a process, real trainers.

A small local fleet turns the group's instances into agents: a new instance in the group gets an
agent; an agent that exits 75 (reclaimed) has its instance terminated, as AWS would, and moto
launches a replacement; an instance that left the group has its agent stopped. Every wait is for
an event (a state transition, a committed checkpoint, a process exit), with generous timeouts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from mamba_training.aws.session import client
from mamba_training.checkpoint.protocol import read_latest
from mamba_training.checkpoint.store import open_store
from mamba_training.fleet.jobs import JobsStore
from mamba_training.spot.emulator import ImdsEmulator
from tests.aws.moto_fleet import ASG, make_fleet

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("jobs_e2e")]

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "tiny.yaml")
BUCKET = "jobs-e2e"
TINY = [
    "model.d_model=32", "model.n_layer=2", "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=2",
    "train.eval_every=100000", "train.eval_batches=2", "train.log_every=5", "train.sample_tokens=0",
    "train.threads=1", "checkpoint.every_steps=10", "logging.cloudwatch=off", "logging.tensorboard=false",
    "logging.plot=false", "spot.poll_seconds=0.05",
]
TIMEOUT = 240.0


def wait_for(what: str, condition: Callable[[], object], timeout: float = TIMEOUT, poll: float = 0.2,
             on_tick: Callable[[], None] | None = None):
    deadline = time.monotonic() + timeout
    while True:
        if on_tick is not None:
            on_tick()
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def env_for(endpoint: str, queue: str, store: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AWS_ENDPOINT_URL": endpoint, "MAMBA_QUEUE_URL": queue,
           "MAMBA_JOBS_STORE": store, "MAMBA_ASG_NAME": ASG}
    return env


def submit(env: dict[str, str], *args: str) -> str:
    sets = [a for s in TINY for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "mamba_training", "submit", CONFIG, *sets, *args], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


class AgentProcess:
    def __init__(self, name: str, workdir: Path, env: dict[str, str], imds: str, *extra: str) -> None:
        self.name = name
        self.log = workdir / f"agent-{name}.log"
        args = ["agent", "--imds-url", imds, "--idle-seconds", "3", "--lease-seconds", "6", "--wait-seconds", "1",
                "--workdir", str(workdir / f"agent-{name}"), *extra]
        with open(self.log, "w") as out:
            # A session of its own, so a test can freeze the agent and its trainer together.
            self.proc = subprocess.Popen([sys.executable, "-m", "mamba_training", *args], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class LocalFleet:
    """The group's instances as local agents (the part of a cloud the moto server cannot play)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.agents: dict[str, AgentProcess] = {}
        self.emulators: dict[str, ImdsEmulator] = {}
        self.exits: dict[str, int] = {}

    def in_group(self) -> list[str]:
        found = client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[ASG])["AutoScalingGroups"]
        return [i["InstanceId"] for i in found[0]["Instances"]] if found else []

    def sync(self) -> None:
        ids = set(self.in_group())
        for instance in ids - set(self.agents):
            emulator = ImdsEmulator(port=0, instance_id=instance).start()
            self.emulators[instance] = emulator
            self.agents[instance] = AgentProcess(instance, self.workdir, self.env, emulator.url, "--exit-when-idle")
        for instance, agent in self.agents.items():
            code = agent.proc.poll()
            if code is not None and instance not in self.exits:
                self.exits[instance] = code
                if code == 75:  # reclaimed: AWS takes the instance away, the group replaces it
                    client("ec2").terminate_instances(InstanceIds=[instance])
            elif code is None and instance not in ids:
                agent.stop()  # scaled in: the instance is gone

    def holder_instance(self, holder: str | None) -> str | None:
        return holder.split("/")[0] if holder else None

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        for emulator in self.emulators.values():
            emulator.stop()


@pytest.fixture
def setup(aws: str, tmp_path: Path):
    client("s3").create_bucket(Bucket=BUCKET)
    queue = client("sqs").create_queue(QueueName="jobs")["QueueUrl"]
    store = f"s3://{BUCKET}/jobs"
    return env_for(aws, queue, store), JobsStore(store), tmp_path


def committed_step(run_store: str) -> int:
    pointer = read_latest(open_store(run_store))
    return pointer["step"] if pointer else -1


def test_jobs_scale_the_fleet_from_zero_run_survive_preemption_fail_cancel_and_scale_back(setup):
    env, jobs, workdir = setup
    make_fleet(desired=0, max_size=3)
    preempted = submit(env, "--set", "train.max_steps=200", "--name", "preempted")
    crashing = submit(env, "--set", f"checkpoint.store=s3://no-such-bucket-{os.getpid()}/run", "--max-attempts", "2",
                      "--name", "crashing")
    cancelled = submit(env, "--set", "train.max_steps=1000000", "--name", "cancelled")

    once = subprocess.run([sys.executable, "-m", "mamba_training", "reconcile", "--once", "--json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    assert (json.loads(once.stdout)["desired_before"], json.loads(once.stdout)["desired"]) == (0, 3)

    fleet = LocalFleet(workdir, env)
    reconciler = subprocess.Popen([sys.executable, "-m", "mamba_training", "reconcile", "--interval", "1"], env=env,
                                  stdout=open(workdir / "reconciler.log", "w"), stderr=subprocess.STDOUT)
    try:
        # Preempt the first job once it has a committed checkpoint.
        run_store = jobs.spec(preempted).run_store
        wait_for("a checkpoint of the first job", lambda: committed_step(run_store) >= 10, on_tick=fleet.sync)
        holder = fleet.holder_instance(jobs.state(preempted)[0].holder)
        assert holder in fleet.emulators, (holder, list(fleet.emulators))
        fleet.emulators[holder].interrupt()
        wait_for("the reclaimed agent to exit 75", lambda: fleet.exits.get(holder) is not None, on_tick=fleet.sync)
        assert fleet.exits[holder] == 75, fleet.agents[holder].output()

        # Cancel the long job once it has a checkpoint.
        long_store = jobs.spec(cancelled).run_store
        wait_for("a checkpoint of the long job", lambda: committed_step(long_store) >= 10, on_tick=fleet.sync)
        proc = subprocess.run([sys.executable, "-m", "mamba_training", "jobs", "cancel", cancelled], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr

        terminal = ("done", "failed", "cancelled")
        wait_for("every job to finish",
                 lambda: all(jobs.state(j)[0].state in terminal for j in (preempted, crashing, cancelled)),
                 on_tick=fleet.sync)
        wait_for("the fleet to return to zero",
                 lambda: not fleet.in_group() and client("autoscaling").describe_auto_scaling_groups(
                     AutoScalingGroupNames=[ASG])["AutoScalingGroups"][0]["DesiredCapacity"] == 0,
                 on_tick=fleet.sync)
        wait_for("every agent to exit", lambda: all(a.proc.poll() is not None for a in fleet.agents.values()),
                 on_tick=fleet.sync)
    finally:
        reconciler.send_signal(signal.SIGTERM)
        reconciler.wait(60)
        fleet.close()

    done = jobs.state(preempted)[0]
    assert done.state == "done" and done.step == 200, done
    assert done.exit_codes[-1] == 0 and done.exit_codes.count(0) == 1 and 75 in done.exit_codes, done
    assert done.attempts == 1 and done.preemptions >= 1, done  # preemptions are not charged
    logs = dict(jobs.logs(preempted))
    assert "resumed from step" in logs[f"run-{done.runs:03d}.log"].decode()

    failed = jobs.state(crashing)[0]
    assert (failed.state, failed.attempts, failed.exit_codes) == ("failed", 2, (1, 1)), failed
    assert "no-such-bucket" in b"".join(data for _, data in jobs.logs(crashing)).decode()

    stopped = jobs.state(cancelled)[0]
    assert stopped.state == "cancelled" and stopped.step is not None and stopped.step >= 10, stopped
    assert committed_step(long_store) == stopped.step  # stopped with a checkpoint
    assert all(code in (0, 75) for code in fleet.exits.values()), fleet.exits


def test_a_lease_that_expired_while_its_holder_was_frozen_is_not_run_twice(setup):
    env, jobs, workdir = setup
    make_fleet(desired=0, max_size=2)
    job = submit(env, "--set", "train.max_steps=1000000", "--name", "frozen")
    run_store = jobs.spec(job).run_store
    first = AgentProcess("first", workdir, env, "off")
    second = None
    try:
        wait_for("a checkpoint from the first agent", lambda: committed_step(run_store) >= 10)
        holder = jobs.state(job)[0].holder
        assert holder and holder.endswith(f"/{first.proc.pid}")
        os.killpg(first.proc.pid, signal.SIGSTOP)  # the agent and its trainer freeze, as in a paused VM
        frozen_at = committed_step(run_store)
        wait_for("the frozen agent's lease to expire", lambda: jobs.lease(job)[0].expires_at < time.time())
        second = AgentProcess("second", workdir, env, "off")
        proc = subprocess.run([sys.executable, "-m", "mamba_training", "reconcile", "--once", "--json"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["returned"] == [job]
        wait_for("the second agent to take the job",
                 lambda: (jobs.state(job)[0].holder or "").endswith(f"/{second.proc.pid}"))
        wait_for("a checkpoint from the second agent", lambda: committed_step(run_store) > frozen_at)
        os.killpg(first.proc.pid, signal.SIGCONT)
        wait_for("the first agent to give up its run",
                 lambda: "another agent took the job" in first.log.read_text(), timeout=60)
        state = jobs.state(job)[0]
        assert state.state == "running" and state.holder.endswith(f"/{second.proc.pid}"), state
        proc = subprocess.run([sys.executable, "-m", "mamba_training", "jobs", "cancel", job], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        wait_for("the job to be cancelled", lambda: jobs.state(job)[0].state == "cancelled")
    finally:
        for agent in (first, second):
            if agent is not None:
                try:
                    os.killpg(agent.proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                agent.stop()
    final = jobs.state(job)[0]
    # One charged attempt: the frozen run was given back (holder lost), the second one was cancelled.
    assert (final.attempts, final.runs, final.preemptions) == (1, 2, 1), final
    assert first.proc.returncode in (0, 75) and second.proc.returncode in (0, 75)


def test_a_lifecycle_termination_returns_the_job_after_its_checkpoint(setup):
    env, jobs, workdir = setup
    make_fleet(desired=1, max_size=1)
    job = submit(env, "--set", "train.max_steps=1000000", "--name", "scaled-in")
    instance = LocalFleet(workdir, env).in_group()[0]
    with ImdsEmulator(port=0, instance_id=instance) as imds:
        agent = AgentProcess("lifecycle", workdir, env, imds.url)
        try:
            run_store = jobs.spec(job).run_store
            wait_for("a checkpoint", lambda: committed_step(run_store) >= 10)
            imds.set_lifecycle("Terminated")
            assert agent.proc.wait(TIMEOUT) == 75, agent.output()
        finally:
            agent.stop()
    state = jobs.state(job)[0]
    assert (state.state, state.attempts, state.preemptions, state.holder) == ("queued", 0, 1, None), state
    assert state.step is not None and state.step == committed_step(run_store) and state.step >= 10
    assert "reclaimed" in agent.output() and "lifecycle" in agent.output().lower()


def test_an_idle_agent_leaves_its_group_and_takes_the_desired_capacity_with_it(setup):
    env, _, workdir = setup
    make_fleet(desired=2, max_size=2)
    fleet = LocalFleet(workdir, env)
    staying, leaving = fleet.in_group()
    autoscaling = client("autoscaling")
    autoscaling.set_instance_protection(AutoScalingGroupName=ASG, InstanceIds=[leaving], ProtectedFromScaleIn=True)
    with ImdsEmulator(port=0, instance_id=leaving) as imds:
        agent = AgentProcess("idle", workdir, env, imds.url)  # no --exit-when-idle: in a group it leaves
        try:
            assert agent.proc.wait(TIMEOUT) == 0, agent.output()
        finally:
            agent.stop()
    group = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[ASG])["AutoScalingGroups"][0]
    assert group["DesiredCapacity"] == 1 and [i["InstanceId"] for i in group["Instances"]] == [staying]
    assert "left" in agent.output()
