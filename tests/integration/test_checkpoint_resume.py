"""Exact resume against S3: training N steps straight and training with stops at steps drawn from a
fixed seed (a SIGTERM, which commits an emergency checkpoint and exits 75, then a SIGKILL, which
loses the steps since the last commit) and resumes, each from an empty local cache against the
S3 store (moto server), give bitwise identical final weights.

The trainer is held at the chosen steps (train/control.py), so each stop lands at exactly its
step whatever the machine's speed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from mamba_training.checkpoint import open_store, read_latest
from tests.checkpoint.conftest import BUCKET, make_bucket

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS, EVERY = 24, 4
SMALL = [
    "model.d_model=32", "model.n_layer=2", "train.batch_size=4", "train.seq_len=32", f"train.max_steps={MAX_STEPS}",
    "train.warmup_steps=2", "train.eval_every=100", "train.eval_batches=1", "train.log_every=4",
    "train.sample_tokens=0", "train.threads=1", f"checkpoint.every_steps={EVERY}", "spot.imds_url=off",
    "logging.cloudwatch=off",
]
SEED = 1337  # the stop steps are drawn from it


def command(tmp: Path, store: str, cache: str) -> list[str]:
    sets = [*SMALL, f"checkpoint.store={store}", f"data.cache_dir={tmp / 'data-cache'}",
            f"checkpoint.cache_dir={tmp / cache}"]
    return [sys.executable, "-m", "mamba_training", "train", "-c", str(REPO / "configs" / "tiny.yaml"),
            *[a for s in sets for a in ("--set", s)]]


def start(tmp: Path, store: str, cache: str, hold: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if hold is not None:
        env |= {"MAMBA_TRAINING_HOLD_AT": str(hold), "MAMBA_TRAINING_CONTROL_DIR": str(tmp / f"control-{cache}")}
    return subprocess.Popen(command(tmp, store, cache), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def wait_until(condition, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited {proc.returncode} before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.01)


def test_stops_and_resumes_from_s3_with_empty_caches_match_a_straight_run(aws: str, tmp_path: Path) -> None:
    make_bucket()
    store_url = f"s3://{BUCKET}/runs/exact"
    store = open_store(store_url)
    rng = random.Random(SEED)
    term_at = rng.randint(1, 10)
    kill_at = rng.randint(term_at + EVERY + 1, MAX_STEPS - 1)
    # Held after step kill_at, the run has committed the last multiple of EVERY before it (the
    # checkpoint of step kill_at itself would be taken at the boundary after the hold).
    kill_committed = (kill_at - 1) // EVERY * EVERY
    print(f"seed {SEED}: SIGTERM at step {term_at}, SIGKILL at step {kill_at} (committed {kill_committed})")
    straight = start(tmp_path, str(tmp_path / "straight"), "cache-straight")

    first = start(tmp_path, store_url, "cache-0", hold=term_at)  # a fresh machine: nothing cached
    wait_until((tmp_path / "control-cache-0" / f"reached-{term_at}").exists, first, f"step {term_at}")
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=240)
    assert first.returncode == 75, err[-3000:]
    assert read_latest(store)["step"] == term_at  # the emergency checkpoint, at exactly that step

    second = start(tmp_path, store_url, "cache-1", hold=kill_at)
    wait_until((tmp_path / "control-cache-1" / f"reached-{kill_at}").exists, second, f"step {kill_at}")
    wait_until(lambda: read_latest(store)["step"] == kill_committed, second, f"commit of step {kill_committed}")
    second.send_signal(signal.SIGKILL)  # the steps after the commit are lost, and must be retrained
    _, err = second.communicate(timeout=240)
    assert second.returncode == -signal.SIGKILL, err[-3000:]
    assert read_latest(store)["step"] == kill_committed

    final = start(tmp_path, store_url, "cache-final")
    _, err = final.communicate(timeout=240)
    assert final.returncode == 0, err[-3000:]
    _, err = straight.communicate(timeout=240)
    assert straight.returncode == 0, err[-3000:]

    store.get_file("final/model.safetensors", tmp_path / "resumed.safetensors")
    resumed = load_file(tmp_path / "resumed.safetensors")
    expected = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), f"{key} differs after stops at {term_at} and {kill_at}"
