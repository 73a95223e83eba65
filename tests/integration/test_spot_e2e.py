"""Spot interruptions end to end: training subprocesses, the IMDS emulator, the moto server's S3.

A notice (or SIGTERM, or a lifecycle termination) stops a real `mamba-training train` process,
which commits an emergency checkpoint to S3 and exits 75; a second process with an empty local
cache — the replacement instance — resumes from S3, and the final weights are bitwise those of
an uninterrupted run, with no step lost.

Every trigger lands at an exact step: the trainer is held after that step (train/control.py)
until the test has served the notice, so nothing here depends on the machine's speed. Random
steps come from a fixed seed that the test prints.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from mamba_training.aws.session import client
from mamba_training.spot.emulator import ImdsEmulator
from mamba_training.train.records import read_run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("spot_e2e")]  # one worker shares the baseline

REPO = Path(__file__).resolve().parents[2]
BUCKET = "spot-e2e"
MAX_STEPS = 60
TINY = [
    "model.d_model=32", "model.n_layer=2", "train.batch_size=4", "train.seq_len=32",
    f"train.max_steps={MAX_STEPS}", "train.warmup_steps=2", "train.eval_every=20", "train.eval_batches=2",
    "train.log_every=1", "train.sample_tokens=0", "train.threads=1", "checkpoint.every_steps=10",
    "logging.cloudwatch=off", "logging.tensorboard=false", "logging.plot=false", "spot.poll_seconds=0.05",
]


# ------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_args(store: str, cache: Path, data_cache: Path, *extra: str) -> list[str]:
    sets = [*TINY, f"checkpoint.store={store}", f"checkpoint.cache_dir={cache}",
            f"data.cache_dir={data_cache}", *extra]
    return ["train", "-c", str(REPO / "configs" / "tiny.yaml"), *[a for s in sets for a in ("--set", s)]]


def child_env(endpoint: str | None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    env.pop("AWS_ENDPOINT_URL", None)
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


class Training:
    """One `mamba-training train` subprocess; output goes to files so pipes never fill up.
    `hold` lists the steps after which the trainer waits for the test (train/control.py)."""

    def __init__(self, workdir: Path, name: str, store: str, *extra: str, data: Path,
                 endpoint: str | None = None, hold: tuple[int, ...] = (), env: dict[str, str] | None = None) -> None:
        self.log = workdir / f"{name}.log"
        self.cache = workdir / f"cache-{name}"  # every process starts with an empty local cache
        self.control = workdir / f"control-{name}"
        args = train_args(store, self.cache, data, *extra)
        environ = {**child_env(endpoint), **(env or {})}
        if hold:
            environ |= {"MAMBA_TRAINING_HOLD_AT": ",".join(map(str, hold)),
                        "MAMBA_TRAINING_CONTROL_DIR": str(self.control)}
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mamba_training", *args], cwd=workdir,
                                         stdout=out, stderr=subprocess.STDOUT, env=environ)

    def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 240) -> None:
        """Wait for an event (generous timeout), failing at once if the process exits first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"training exited {self.proc.returncode} before {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s:\n{self.output()}")
            time.sleep(0.01)

    def wait_held(self, step: int) -> None:
        """Until the trainer has completed `step` and waits there."""
        self.wait_until((self.control / f"reached-{step}").exists, f"hold at step {step}")

    def release(self, step: int) -> None:
        (self.control / f"release-{step}").touch()

    def local_events(self) -> list[dict]:
        """Events this process has recorded so far (its local records, before any upload)."""
        rows = []
        for path in self.cache.glob("**/records/*/events.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return rows

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"training did not exit within {timeout} s:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text()[-4000:]


def s3_weights(key: str) -> dict[str, torch.Tensor]:
    body = client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
    return load_safetensors(body)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs from the uninterrupted run"


def exits(events: list[dict]) -> list[dict]:
    return [e for e in events if e["kind"] == "exit"]


def assert_every_step_once(metrics: list[dict]) -> None:
    """Zero lost steps: each step was trained (and logged) exactly once across all segments."""
    steps = sorted(m["step"] for m in metrics)
    assert steps == list(range(1, MAX_STEPS + 1)), steps


def assert_committed(run: str, step: int) -> None:
    head = client("s3").head_object(Bucket=BUCKET, Key=f"{run}/checkpoints/step_{step:08d}/manifest.json")
    assert head["ContentLength"] > 0


class GatedProxy:
    """A TCP proxy to the moto server whose uploads the test can stop and let go: while the gate
    is closed, bytes from the trainer are held (its connections stay open), so a checkpoint save
    stays in flight exactly as long as the test wants."""

    def __init__(self, target: str) -> None:
        self.target_port = int(target.rsplit(":", 1)[1])
        self.gate = threading.Event()
        self.gate.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, gated: bool) -> None:
        try:
            while data := src.recv(16384):
                if gated:
                    self.gate.wait()
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.gate.set()
        self.listener.close()


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared-corpus cache for every run in this module."""
    return tmp_path_factory.mktemp("spot-data")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict[str, torch.Tensor]:
    """The final weights of one uninterrupted run (local store, no watcher)."""
    workdir = tmp_path_factory.mktemp("spot-baseline")
    run = Training(workdir, "baseline", str(workdir / "run"), "spot.imds_url=off", data=data)
    assert run.wait(240) == 0, run.output()
    return load_file(workdir / "run" / "final" / "model.safetensors")


@pytest.fixture
def emulator() -> Iterator[ImdsEmulator]:
    # on-demand: the cost ledger then needs no spot price, which costs seconds of moto EC2 start-up
    emu = ImdsEmulator(port=0, lifecycle="on-demand").start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def s3(aws: str) -> str:
    """The moto server's URL, with the test bucket created."""
    client("s3").create_bucket(Bucket=BUCKET)
    return aws


# ------------------------------------------------------------------ tests
SEED = 20261201  # random steps below are drawn from it


def test_notice_at_a_random_step_then_a_fresh_instance_resumes_from_s3_bitwise(
    baseline: dict, data: Path, emulator: ImdsEmulator, s3: str, tmp_path: Path
) -> None:
    notice_step = random.Random(SEED).randint(3, 35)
    print(f"seed {SEED}: notice at step {notice_step}")
    store = f"s3://{BUCKET}/notice"
    first = Training(tmp_path, "first", store, f"spot.imds_url={emulator.url}", data=data, endpoint=s3,
                     hold=(notice_step,))
    first.wait_held(notice_step)
    emulator.interrupt("terminate")
    assert first.wait() == 75, f"seed {SEED}:\n{first.output()}"
    assert "preempted (interruption:terminate)" in first.output()

    records = read_run(store)
    (exit_event,) = exits(records.events)
    assert exit_event["step"] == notice_step, f"seed {SEED}"  # the boundary right after the held step
    assert exit_event["reason"] == "interruption:terminate" and exit_event["exit_code"] == 75
    assert exit_event["lost_steps"] == 0 and exit_event["committed_step"] == notice_step
    assert exit_event["notice_to_durable_s"] >= 0
    assert_committed("notice", notice_step)
    interruption = next(e for e in records.events if e["kind"] == "interruption")
    # The emulator's notice time is 120 s after it; the trainer reads it some time later.
    assert interruption["action"] == "terminate" and 0 < interruption["seconds_left"] <= 120
    assert interruption["step"] == notice_step and interruption["malformed"] is False

    emulator.reset()  # the replacement instance gets no notice
    second = Training(tmp_path, "second", store, f"spot.imds_url={emulator.url}", data=data, endpoint=s3)
    assert second.wait() == 0, second.output()
    assert_same_weights(baseline, s3_weights("notice/final/model.safetensors"))
    records = read_run(store)
    assert [e["kind"] for e in records.events if e["kind"] in ("start", "resume")] == ["start", "resume"]
    assert next(e for e in records.events if e["kind"] == "resume")["step"] == notice_step
    assert [e["lost_steps"] for e in exits(records.events)] == [0, 0]
    assert_every_step_once(records.metrics)
    # The replacement's running cost starts from what the first instance spent.
    first_cost = next(l["cost_usd"] for l in records.ledgers if l["segment"] == records.segments[0])
    resumed = [m for m in records.metrics if m["segment"] == records.segments[-1]]
    assert first_cost > 0 and resumed[0]["cost_usd"] >= first_cost


def test_the_budget_counts_every_instance_of_the_run(data: Path, emulator: ImdsEmulator, s3: str,
                                                     tmp_path: Path) -> None:
    """train.max_cost_usd stops the run with a checkpoint; a replacement that starts already over
    the budget (earlier segments' ledgers) stops again at its first metrics line. The ledger counts
    0.1 s per step (MAMBA_TRAINING_FAKE_SECONDS_PER_STEP), so the stopping step is exact."""
    store = f"s3://{BUCKET}/budget"
    limit, per_step = 0.0004, 0.1
    sets = [f"spot.imds_url={emulator.url}", f"train.max_cost_usd={limit}"]
    clock = {"MAMBA_TRAINING_FAKE_SECONDS_PER_STEP": str(per_step)}
    first = Training(tmp_path, "first", store, *sets, data=data, endpoint=s3, env=clock)
    assert first.wait() == 0, first.output()
    assert "stopped:" in first.output() and "max_cost_usd" in first.output()
    records = read_run(store)
    (ledger,) = records.ledgers
    price = ledger["entries"][0]["usd_per_hour"]
    steps_to_limit = limit * 3600 / (per_step * price)  # the cost passes the limit after this many steps
    assert price > 0 and 0.05 < steps_to_limit % 1 < 0.95, price  # not a near-tie for float sums
    expected = math.ceil(steps_to_limit)
    assert expected < MAX_STEPS
    (stop,) = exits(records.events)
    assert stop["reason"] == "budget" and stop["step"] == stop["committed_step"] == expected, (stop, price)
    assert_committed("budget", expected)

    second = Training(tmp_path, "second", store, *sets, data=data, endpoint=s3, env=clock)
    assert second.wait() == 0, second.output()
    records = read_run(store)
    again = exits(records.events)[-1]
    assert again["reason"] == "budget" and again["step"] == expected + 1  # log_every=1: one step
    spent = sorted(l["cost_usd"] for l in records.ledgers)
    assert spent == pytest.approx(sorted([expected * per_step * price / 3600, per_step * price / 3600]), abs=1e-6)


def test_three_interruptions_in_one_run(
    baseline: dict, data: Path, emulator: ImdsEmulator, s3: str, tmp_path: Path
) -> None:
    """A spot notice (after a rebalance recommendation), a lifecycle termination, then SIGTERM,
    each while the trainer is held at its step."""
    store = f"s3://{BUCKET}/thrice"
    triggers = [
        (8, lambda proc: emulator.interrupt("stop"), "interruption:stop"),
        (24, lambda proc: emulator.set_lifecycle("Terminated"), "lifecycle:terminating"),
        (40, lambda proc: proc.proc.send_signal(signal.SIGTERM), "signal:SIGTERM"),
    ]
    for n, (step, trigger, reason) in enumerate(triggers):
        emulator.reset()
        hold = (3, step) if n == 0 else (step,)
        proc = Training(tmp_path, f"segment-{n}", store, f"spot.imds_url={emulator.url}", data=data, endpoint=s3,
                        hold=hold)
        if n == 0:
            proc.wait_held(3)
            emulator.rebalance()  # releases the hold: an early checkpoint of step 3, and training goes on
        proc.wait_held(step)
        trigger(proc)
        assert proc.wait() == 75, proc.output()
        assert f"preempted ({reason})" in proc.output()
        last_exit = exits(read_run(store).events)[-1]
        assert last_exit["reason"] == reason and last_exit["lost_steps"] == 0
        assert last_exit["step"] == last_exit["committed_step"] == step
        assert_committed("thrice", step)  # the emergency checkpoint, before retention prunes it
    emulator.reset()
    last = Training(tmp_path, "segment-last", store, f"spot.imds_url={emulator.url}", data=data, endpoint=s3)
    assert last.wait() == 0, last.output()

    assert_same_weights(baseline, s3_weights("thrice/final/model.safetensors"))
    records = read_run(store)
    assert len(records.segments) == 4
    assert [e["reason"] for e in exits(records.events)] == [r for _, _, r in triggers] + ["completed"]
    assert all(e["lost_steps"] == 0 for e in exits(records.events))
    assert [(e["kind"], e["step"]) for e in records.events if e["kind"] in ("rebalance", "early_checkpoint")] == [
        ("rebalance", 3), ("early_checkpoint", 3)]
    assert ("checkpoint", 3) in [(e["kind"], e.get("checkpoint_step")) for e in records.events]
    assert_every_step_once(records.metrics)


def test_an_unreachable_emulator_does_not_stop_training(baseline: dict, data: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run = Training(tmp_path, "unreachable", str(tmp_path / "run"), f"spot.imds_url={url}", data=data)
    assert run.wait() == 0, run.output()
    assert run.log.read_text().count(f"IMDS {url} unavailable") == 1  # once per failure streak, not per poll
    assert_same_weights(baseline, load_file(tmp_path / "run" / "final" / "model.safetensors"))


def test_a_notice_during_an_in_flight_async_save(data: Path, emulator: ImdsEmulator, s3: str, tmp_path: Path) -> None:
    """The step-10 save is handed off while the test holds every upload; the notice comes at step
    11; only once the trainer has seen it are the uploads let go: the in-flight save is flushed and
    committed after the notice, then the emergency checkpoint of step 11."""
    proxy = GatedProxy(s3)
    store = f"s3://{BUCKET}/inflight"
    try:
        first = Training(tmp_path, "first", store, f"spot.imds_url={emulator.url}", "checkpoint.async_save=true",
                         data=data, endpoint=proxy.url, hold=(10, 11))
        first.wait_held(10)  # the step-10 checkpoint is taken at the boundary after this hold
        proxy.gate.clear()
        first.release(10)
        first.wait_held(11)  # the step-10 save is in flight: its upload cannot pass the gate
        emulator.interrupt("terminate")
        first.wait_until(lambda: any(e["kind"] == "interruption" for e in first.local_events()), "the notice")
        assert not any(e["kind"] == "checkpoint" for e in first.local_events())  # nothing committed yet
        proxy.gate.set()
        assert first.wait() == 75, first.output()
    finally:
        proxy.close()
    events = read_run(store).events
    kinds = [(e["kind"], e.get("checkpoint_step")) for e in events]
    assert kinds.index(("checkpoint", 10)) > kinds.index(("interruption", None)), kinds  # committed after the notice
    assert kinds.index(("checkpoint", 11)) > kinds.index(("checkpoint", 10)), kinds
    (exit_event,) = exits(events)
    assert (exit_event["step"], exit_event["committed_step"], exit_event["lost_steps"]) == (11, 11, 0)
    assert_committed("inflight", 10)
    assert_committed("inflight", 11)
    # Resuming from a committed checkpoint is proved bitwise by the tests above; the point here is
    # that the in-flight save was flushed and committed before the emergency one.
