"""Multi-node training on one machine: a coordinator process, `launch` processes as nodes (gloo,
one trainer each), one IMDS emulator per node. Every action happens at an exact step through the
trainer's hold hook (MAMBA_TRAINING_HOLD_AT, one control directory per node): the test waits for
`reached-N`, then serves a notice, starts a node, kills one or freezes one (SIGSTOP: a network
cut, no TCP reset), and the stop lands at step N.

Asserted: exit codes, that every wait ends (generous timeouts, no hang), that a noticed stop
loses no step (the next world resumes at the stop step), the exact final step, one writer per
committed checkpoint, every world size in the run's records, and a final loss close to a
straight single-process run of the same global batches.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mamba_training.spot.emulator import ImdsEmulator

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 36
TRAIN = ["--set", "model.d_model=32", "--set", "model.n_layer=1", "--set", "train.seq_len=32",
         "--set", "train.batch_size=12", "--set", "train.warmup_steps=4", "--set", "train.log_every=1",
         "--set", "train.eval_every=100000", "--set", "train.sample_tokens=0", "--set", "train.threads=1",
         "--set", f"train.max_steps={MAX_STEPS}", "--set", "checkpoint.every_steps=1000",
         "--set", "spot.poll_seconds=0.2", "--set", "logging.tensorboard=false", "--set", "logging.plot=false",
         "--set", "logging.cloudwatch=off", "-q"]
WAIT = 300  # seconds: a start on two busy shared cores takes ~20 s; a hang takes forever


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, what: str, procs: tuple[subprocess.Popen, ...] = (), timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for proc in procs:
            assert proc.poll() is None, f"{what}: a process exited {proc.returncode} first"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (the node's trainers: torch starts them in sessions of their own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


class Cluster:
    """The coordinator and nodes of one run; every process here is started, and ended, by the test."""

    def __init__(self, tmp: Path, seed: int) -> None:
        self.tmp, self.seed = tmp, seed
        self.store = tmp / "run"
        self.env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.port = free_port()
        self.coordinator: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}
        self.imds: dict[str, ImdsEmulator] = {}
        self.start_coordinator()

    def start_coordinator(self) -> None:
        log = self.tmp / "coordinator.log"
        log.write_text("")
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "mamba_training", "coordinator", "--port", str(self.port)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=log.open("a"))
        wait_until(lambda: "listening" in log.read_text(), "the coordinator", (self.coordinator,))

    def control(self, name: str) -> Path:
        return self.tmp / f"control-{name}"

    def start_node(self, name: str, hold_at: list[int], nnodes: str = "1:2",
                   extra: tuple[str, ...] = ()) -> subprocess.Popen:
        self.control(name).mkdir(exist_ok=True)
        if name in self.imds:  # the same instance started again
            self.imds[name].stop()
        self.imds[name] = ImdsEmulator("127.0.0.1", 0).start()
        env = dict(self.env)
        if hold_at:
            env.update(MAMBA_TRAINING_HOLD_AT=",".join(map(str, hold_at)), MAMBA_TRAINING_CONTROL_DIR=str(self.control(name)))
        args = [sys.executable, "-m", "mamba_training", "launch", "--coordinator", f"127.0.0.1:{self.port}",
                "--nnodes", nnodes, "--", *TRAIN, "--set", f"train.seed={self.seed}",
                "--set", f"checkpoint.store={self.store}", "--set", f"checkpoint.cache_dir={self.tmp / name / 'cache'}",
                "--set", f"data.cache_dir={self.tmp / 'data'}", "--set", f"spot.imds_url={self.imds[name].url}", *extra]
        self.nodes[name] = subprocess.Popen(args, env=env, stdout=self.log(name).open("w"), stderr=subprocess.STDOUT)
        return self.nodes[name]

    def log(self, name: str) -> Path:
        return self.tmp / f"node-{name}.log"

    def reached(self, name: str, step: int) -> None:
        wait_until(lambda: (self.control(name) / f"reached-{step}").exists(), f"node {name} at step {step}",
                   (self.nodes[name],))

    def rank0(self, names: list[str], nodes: int) -> str:
        """The node that holds rank 0 in the newest round of `nodes` nodes."""
        needle = f"as group rank 0 of {nodes} nodes"
        return wait_until(lambda: next((n for n in names if needle in self.log(n).read_text()), None),
                          f"a rank-0 node among {names}")

    def kill_node(self, name: str) -> None:
        proc = self.nodes[name]
        for pid in [*children(proc.pid), proc.pid]:  # the instance vanishes: agent and trainers at once
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=WAIT)

    def freeze_node(self, name: str) -> None:
        """The instance stops answering without closing a connection (a network cut): SIGSTOP of
        its trainers and agent, so no peer gets a TCP reset."""
        proc = self.nodes[name]
        for pid in [*children(proc.pid), proc.pid]:
            os.kill(pid, signal.SIGSTOP)

    def close(self) -> None:
        for proc in self.nodes.values():
            if proc.poll() is None:
                for pid in [*children(proc.pid), proc.pid]:
                    os.kill(pid, signal.SIGKILL)
                proc.wait()
        if self.coordinator is not None and self.coordinator.poll() is None:
            self.coordinator.terminate()
            self.coordinator.wait(timeout=60)
        for emulator in self.imds.values():
            emulator.stop()

    # ----------------------------------------------------------------- the run's records
    def events(self) -> list[dict]:
        lines = []
        for path in sorted((self.store / "records").glob("*/events.jsonl")):
            lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return lines

    def latest_step(self) -> int | None:
        try:
            return json.loads((self.store / "latest.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            return None

    def manifests(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.store.glob("checkpoints/step_*/manifest.json"))]

    def final_loss(self) -> float:
        metrics = []
        for path in (self.store / "records").glob("*/metrics.jsonl"):
            metrics += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return next(m["loss"] for m in metrics if m["step"] == MAX_STEPS)


def straight_loss(tmp: Path, seed: int) -> float:
    store = tmp / "straight"
    subprocess.run([sys.executable, "-m", "mamba_training", "train", *TRAIN, "--set", f"train.seed={seed}",
                    "--set", f"checkpoint.store={store}", "--set", f"checkpoint.cache_dir={tmp / 'straight-cache'}",
                    "--set", f"data.cache_dir={tmp / 'data'}", "--set", "spot.imds_url=off"],
                   check=True, timeout=WAIT, capture_output=True,
                   env={**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    lines = [json.loads(x) for p in (store / "records").glob("*/metrics.jsonl") for x in p.read_text().splitlines()]
    return next(m["loss"] for m in lines if m["step"] == MAX_STEPS)


def resumes(events: list[dict]) -> list[tuple[int, int]]:
    """(step, world size) of every start and resume, in order."""
    return [(e["step"], e["world_size"]) for e in events if e["kind"] in ("start", "resume")]


@pytest.fixture
def cluster(tmp_path: Path):
    seed = 20261201
    print(f"seed {seed}")
    made = Cluster(tmp_path, seed)
    yield made
    made.close()


def test_notice_to_the_node_without_rank_0_then_a_replacement_joins_then_a_node_dies(cluster: Cluster) -> None:
    first, second = cluster.start_node("a", [8, 18, 28]), cluster.start_node("b", [8, 18, 28])
    cluster.reached("a", 8)
    cluster.reached("b", 8)
    rank0 = cluster.rank0(["a", "b"], 2)
    warned = "b" if rank0 == "a" else "a"
    survivor = rank0

    # A notice to the node without rank 0: the stop lands at step 8, rank 0 commits it, the
    # warned node exits 75 and the survivor re-forms alone from step 8.
    cluster.imds[warned].interrupt("terminate")
    assert cluster.nodes[warned].wait(timeout=WAIT) == 75
    cluster.reached(survivor, 18)
    assert resumes(cluster.events())[-1] == (8, 1)

    # A replacement joins: the survivor's agent stops its trainer (SIGTERM -> commit of step 18)
    # and both re-form at two nodes from step 18.
    cluster.start_node("c", [28])
    cluster.reached("c", 28)
    cluster.reached(survivor, 28)
    assert resumes(cluster.events())[-1] == (18, 2)

    # The replacement vanishes (kill -9 of its agent and trainer): the survivor's trainer fails
    # in its next collective, its agent re-forms alone from the last commit (step 18) and finishes.
    (cluster.control(survivor) / "reached-28").unlink()
    cluster.kill_node("c")
    cluster.reached(survivor, 28)  # trained again from step 18, alone
    (cluster.control(survivor) / "release-28").touch()
    assert cluster.nodes[survivor].wait(timeout=WAIT) == 0
    events = cluster.events()
    assert resumes(events) == [(0, 2), (8, 1), (18, 2), (18, 1)]
    noticed = next(e for e in events if e["kind"] == "exit" and e["step"] == 8)  # recorded by rank 0, a peer
    assert (noticed["reason"], noticed["committed_step"], noticed["lost_steps"]) == ("signal:peer", 8, 0)
    commits = [e["checkpoint_step"] for e in events if e["kind"] == "checkpoint"]
    assert {8, 18, MAX_STEPS} <= set(commits) and len(commits) == len(set(commits))  # each step committed once
    assert cluster.manifests()[-1]["step"] == MAX_STEPS
    assert json.loads((cluster.store / "latest.json").read_text())["step"] == MAX_STEPS
    assert cluster.final_loss() == pytest.approx(straight_loss(cluster.tmp, cluster.seed), rel=0.05)


def test_notice_to_the_rank_0_node_then_sigterm_to_a_node_then_the_coordinator_restarts(cluster: Cluster) -> None:
    names = ["a", "b", "c"]
    for name in names:
        cluster.start_node(name, [8, 18, 28], nnodes="1:3")
    for name in names:
        cluster.reached(name, 8)
    warned = cluster.rank0(names, 3)
    rest = [n for n in names if n != warned]

    # A notice to the node holding rank 0: it still commits step 8 once, then leaves (75); the
    # other two re-form, one of them now rank 0, from step 8.
    cluster.imds[warned].interrupt("terminate")
    assert cluster.nodes[warned].wait(timeout=WAIT) == 75
    for name in rest:
        cluster.reached(name, 18)
    assert resumes(cluster.events())[-1] == (8, 2)

    # systemd stops one node (SIGTERM to its launcher): step 18 is committed, that node exits 75
    # and the last one continues alone from step 18.
    stopped, last = rest
    cluster.nodes[stopped].send_signal(signal.SIGTERM)
    assert cluster.nodes[stopped].wait(timeout=WAIT) == 75
    cluster.reached(last, 28)
    assert resumes(cluster.events())[-1] == (18, 1)

    # The coordinator goes away: the node's agent loses the rendezvous, its trainer commits step
    # 28 and the node exits 1 (systemd restarts it); with a new coordinator it resumes at 28.
    cluster.coordinator.terminate()
    cluster.coordinator.wait(timeout=60)
    assert cluster.nodes[last].wait(timeout=WAIT) == 1
    cluster.start_coordinator()
    assert cluster.start_node(last, [], nnodes="1:3").wait(timeout=WAIT) == 0

    events = cluster.events()
    assert resumes(events) == [(0, 3), (8, 2), (18, 1), (28, 1)]
    stops = {e["step"]: e for e in events if e["kind"] == "exit" and e["step"] < MAX_STEPS}
    assert stops[8]["reason"] == "interruption:terminate" and stops[8]["lost_steps"] == 0  # rank 0 was warned
    assert all(stops[s]["committed_step"] == s for s in (8, 18, 28))
    commits = [e["checkpoint_step"] for e in events if e["kind"] == "checkpoint"]
    assert {8, 18, 28, MAX_STEPS} <= set(commits) and len(commits) == len(set(commits))
    assert json.loads((cluster.store / "latest.json").read_text())["step"] == MAX_STEPS


def test_a_frozen_node_is_detected_by_the_collective_timeout_and_the_survivor_resumes_from_the_last_commit(
        cluster: Cluster) -> None:
    """A node that stops answering without closing its connections (SIGSTOP of its agent and
    trainer: a network cut) fails the survivor's next collective after train.collective_timeout_s
    (10 s here); the survivor's agent re-forms alone and resumes from the last committed
    checkpoint (step 4: the frozen node's lost steps 5-8 are trained again) to the exact end."""
    timeout_s, every, hold, steps = 10, 4, 8, 16
    extra = ("--set", f"train.collective_timeout_s={timeout_s}", "--set", f"checkpoint.every_steps={every}",
             "--set", f"train.max_steps={steps}")
    for name in ("a", "b"):
        cluster.start_node(name, [hold], extra=extra)
    for name in ("a", "b"):
        cluster.reached(name, hold)
    wait_until(lambda: cluster.latest_step() == every, f"the commit of step {every}")
    frozen = cluster.rank0(["a", "b"], 2)  # the writer, and the host of the process group's store
    survivor = "b" if frozen == "a" else "a"

    (cluster.control(survivor) / f"reached-{hold}").unlink()
    frozen_at = time.monotonic()
    cluster.freeze_node(frozen)
    # The survivor's trainer fails its held all-reduce on the timeout; its agent re-forms alone.
    wait_until(lambda: "as group rank 0 of 1 nodes" in cluster.log(survivor).read_text(),
               "the survivor re-forming alone", (cluster.nodes[survivor],))
    print(f"frozen -> survivor re-formed alone: {time.monotonic() - frozen_at:.1f}s (timeout {timeout_s}s)")
    said = [line for line in cluster.log(survivor).read_text().splitlines() if line.startswith("error:")]
    assert len(said) == 1 and re.fullmatch(  # one line from the trainer, naming the timeout
        rf"error: a peer stopped answering or went away \(train\.collective_timeout_s {timeout_s}s\): "
        rf"Timed out waiting {timeout_s * 1000}ms for (send|recv) operation to complete", said[0]), said
    cluster.kill_node(frozen)  # the frozen instance never comes back

    cluster.reached(survivor, hold)  # trained steps 5-8 again, alone
    (cluster.control(survivor) / f"release-{hold}").touch()
    assert cluster.nodes[survivor].wait(timeout=WAIT) == 0
    events = cluster.events()
    assert resumes(events) == [(0, 2), (every, 1)]
    commits = [e["checkpoint_step"] for e in events if e["kind"] == "checkpoint"]
    assert {8, 12, steps} <= set(commits) and len(commits) == len(set(commits))  # each step committed once
    assert cluster.latest_step() == steps and cluster.manifests()[-1]["step"] == steps
