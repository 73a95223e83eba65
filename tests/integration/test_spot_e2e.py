"""Spot interruptions end to end: training subprocesses, the IMDS emulator, the moto server's S3.

A notice (or SIGTERM, or a lifecycle termination) stops a real `mamba-training train` process,
which commits an emergency checkpoint to S3 and exits 75; a second process with an empty local
cache — the replacement instance — resumes from S3, and the final weights are bitwise those of
an uninterrupted run, with no step lost.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

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
    """One `mamba-training train` subprocess; output goes to files so pipes never fill up."""

    def __init__(self, workdir: Path, name: str, store: str, *extra: str, data: Path,
                 endpoint: str | None = None) -> None:
        self.log = workdir / f"{name}.log"
        self.cache = workdir / f"cache-{name}"  # every process starts with an empty local cache
        args = train_args(store, self.cache, data, *extra)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mamba_training", *args], cwd=workdir,
                                         stdout=out, stderr=subprocess.STDOUT, env=child_env(endpoint))

    def local_steps(self) -> list[int]:
        """Steps this process has logged so far (from its local records)."""
        steps = []
        for path in self.cache.glob("**/records/*/metrics.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    steps.append(json.loads(line)["step"])
                except (json.JSONDecodeError, KeyError):
                    continue
        return steps

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(s >= step for s in self.local_steps()):
            if self.proc.poll() is not None:
                raise AssertionError(f"training exited {self.proc.returncode} before step {step}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no step {step} within {timeout} s:\n{self.output()}")
            time.sleep(0.01)

    def wait(self, timeout: float = 120) -> int:
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


class ThrottledProxy:
    """A TCP proxy to the moto server that slows uploads, so a checkpoint save stays in flight."""

    def __init__(self, target: str, bytes_per_second: float) -> None:
        self.target_port = int(target.rsplit(":", 1)[1])
        self.rate = bytes_per_second
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

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while data := src.recv(16384):
                if slow:
                    time.sleep(len(data) / self.rate)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
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
def test_notice_at_a_random_step_then_a_fresh_instance_resumes_from_s3_bitwise(
    baseline: dict, data: Path, emulator: ImdsEmulator, s3: str, tmp_path: Path
) -> None:
    seed = int(time.time())
    notice_step = random.Random(seed).randint(3, 35)
    store = f"s3://{BUCKET}/notice"
    first = Training(tmp_path, "first", store, f"spot.imds_url={emulator.url}", data=data, endpoint=s3)
    first.wait_for_step(notice_step)
    emulator.interrupt("terminate")
    assert first.wait() == 75, f"seed {seed}:\n{first.output()}"
    assert "preempted (interruption:terminate)" in first.output()

    records = read_run(store)
    (exit_event,) = exits(records.events)
    stopped = exit_event["step"]
    assert notice_step <= stopped < MAX_STEPS, f"seed {seed}"
    assert exit_event["reason"] == "interruption:terminate" and exit_event["exit_code"] == 75
    assert exit_event["lost_steps"] == 0 and exit_event["committed_step"] == stopped
    assert 0 <= exit_event["notice_to_durable_s"] < 30
    assert_committed("notice", stopped)
    interruption = next(e for e in records.events if e["kind"] == "interruption")
    assert interruption["action"] == "terminate" and 100 < interruption["seconds_left"] <= 120

    emulator.reset()  # the replacement instance gets no notice
    second = Training(tmp_path, "second", store, f"spot.imds_url={emulator.url}", data=data, endpoint=s3)
    assert second.wait() == 0, second.output()
    assert_same_weights(baseline, s3_weights("notice/final/model.safetensors"))
    records = read_run(store)
    assert [e["kind"] for e in records.events if e["kind"] in ("start", "resume")] == ["start", "resume"]
    assert next(e for e in records.events if e["kind"] == "resume")["step"] == stopped
    assert [e["lost_steps"] for e in exits(records.events)] == [0, 0]
    assert_every_step_once(records.metrics)
    # The replacement's running cost starts from what the first instance spent.
    first_cost = next(l["cost_usd"] for l in records.ledgers if l["segment"] == records.segments[0])
    resumed = [m for m in records.metrics if m["segment"] == records.segments[-1]]
    assert first_cost > 0 and resumed[0]["cost_usd"] >= first_cost


def test_the_budget_counts_every_instance_of_the_run(data: Path, emulator: ImdsEmulator, s3: str,
                                                     tmp_path: Path) -> None:
    """train.max_cost_usd stops the run with a checkpoint; a replacement that starts already over
    the budget (earlier segments' ledgers) stops again at its first metrics line."""
    store = f"s3://{BUCKET}/budget"
    sets = [f"spot.imds_url={emulator.url}", "train.max_cost_usd=0.0004"]  # ~1.4 s of a $1/h instance
    first = Training(tmp_path, "first", store, *sets, data=data, endpoint=s3)
    assert first.wait() == 0, first.output()
    assert "stopped:" in first.output() and "max_cost_usd" in first.output()
    records = read_run(store)
    (stop,) = exits(records.events)
    assert stop["reason"] == "budget" and stop["committed_step"] == stop["step"] < MAX_STEPS
    assert_committed("budget", stop["step"])

    second = Training(tmp_path, "second", store, *sets, data=data, endpoint=s3)
    assert second.wait() == 0, second.output()
    records = read_run(store)
    again = exits(records.events)[-1]
    assert again["reason"] == "budget" and again["step"] == stop["step"] + 1  # log_every=1: one step
    spent = [l["cost_usd"] for l in records.ledgers]
    assert len(spent) == 2 and sum(spent) > 0.0004


def test_three_interruptions_in_one_run(
    baseline: dict, data: Path, emulator: ImdsEmulator, s3: str, tmp_path: Path
) -> None:
    """A spot notice (after a rebalance recommendation), a lifecycle termination, then SIGTERM."""
    store = f"s3://{BUCKET}/thrice"
    triggers = [
        (8, lambda proc: emulator.interrupt("stop"), "interruption:stop"),
        (24, lambda proc: emulator.set_lifecycle("Terminated"), "lifecycle:terminating"),
        (40, lambda proc: proc.proc.send_signal(signal.SIGTERM), "signal:SIGTERM"),
    ]
    for n, (step, trigger, reason) in enumerate(triggers):
        emulator.reset()
        proc = Training(tmp_path, f"segment-{n}", store, f"spot.imds_url={emulator.url}", data=data, endpoint=s3)
        if n == 0:
            proc.wait_for_step(3)
            emulator.rebalance()  # an early checkpoint, and training goes on
        proc.wait_for_step(step)
        trigger(proc)
        assert proc.wait() == 75, proc.output()
        assert f"preempted ({reason})" in proc.output()
        last_exit = exits(read_run(store).events)[-1]
        assert last_exit["reason"] == reason and last_exit["lost_steps"] == 0
        assert_committed("thrice", last_exit["step"])  # the emergency checkpoint, before retention prunes it
    emulator.reset()
    last = Training(tmp_path, "segment-last", store, f"spot.imds_url={emulator.url}", data=data, endpoint=s3)
    assert last.wait() == 0, last.output()

    assert_same_weights(baseline, s3_weights("thrice/final/model.safetensors"))
    records = read_run(store)
    assert len(records.segments) == 4
    assert [e["reason"] for e in exits(records.events)] == [r for _, _, r in triggers] + ["completed"]
    assert all(e["lost_steps"] == 0 for e in exits(records.events))
    assert [e["kind"] for e in records.events if e["kind"] in ("rebalance", "early_checkpoint")] == [
        "rebalance", "early_checkpoint"]
    assert_every_step_once(records.metrics)


def test_an_unreachable_emulator_does_not_stop_training(baseline: dict, data: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run = Training(tmp_path, "unreachable", str(tmp_path / "run"), f"spot.imds_url={url}", data=data)
    assert run.wait() == 0, run.output()
    assert run.output().count(f"IMDS {url} unavailable") == 1  # once per failure streak, not per poll
    assert_same_weights(baseline, load_file(tmp_path / "run" / "final" / "model.safetensors"))


def test_a_notice_during_an_in_flight_async_save(data: Path, emulator: ImdsEmulator, s3: str, tmp_path: Path) -> None:
    """Uploads go through a slow link: the step-10 save is still uploading when the notice comes."""
    proxy = ThrottledProxy(s3, bytes_per_second=400_000)
    store = f"s3://{BUCKET}/inflight"
    try:
        first = Training(tmp_path, "first", store, f"spot.imds_url={emulator.url}", "checkpoint.async_save=true",
                         data=data, endpoint=proxy.url)
        first.wait_for_step(10)  # the step-10 save is handed to the background writer now
        emulator.interrupt("terminate")
        assert first.wait() == 75, first.output()
    finally:
        proxy.close()
    events = read_run(store).events
    kinds = [(e["kind"], e.get("checkpoint_step")) for e in events]
    assert kinds.index(("checkpoint", 10)) > kinds.index(("interruption", None)), kinds  # committed after the notice
    (exit_event,) = exits(events)
    assert exit_event["lost_steps"] == 0  # the flushed save may itself be the emergency checkpoint
    assert_committed("inflight", 10)
    assert_committed("inflight", exit_event["step"])
    # Resuming from a committed checkpoint is proved bitwise by the tests above; the point here is
    # that the in-flight save was flushed and committed before the emergency one.
