"""Exact resume against S3: training N steps straight and training with stops at random moments
(a SIGTERM, which commits an emergency checkpoint and exits 75, then a SIGKILL, which loses the
steps since the last commit) and resumes, each from an empty local cache against the S3 store
(moto server), give bitwise identical final weights."""

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
SMALL = [
    "model.d_model=32", "model.n_layer=2", "train.batch_size=4", "train.seq_len=32", "train.max_steps=24",
    "train.warmup_steps=2", "train.eval_every=100", "train.eval_batches=1", "train.log_every=4",
    "train.sample_tokens=0", "train.threads=1", "checkpoint.every_steps=4", "spot.imds_url=off",
    "logging.cloudwatch=off",
]


def command(tmp: Path, store: str, cache: str) -> list[str]:
    sets = [*SMALL, f"checkpoint.store={store}", f"data.cache_dir={tmp / 'data-cache'}",
            f"checkpoint.cache_dir={tmp / cache}"]
    return [sys.executable, "-m", "mamba_training", "train", "-c", str(REPO / "configs" / "tiny.yaml"),
            *[a for s in sets for a in ("--set", s)]]


def start(tmp: Path, store: str, cache: str) -> subprocess.Popen:
    return subprocess.Popen(command(tmp, store, cache), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_stops_and_resumes_from_s3_with_empty_caches_match_a_straight_run(aws: str, tmp_path: Path) -> None:
    make_bucket()
    store_url = f"s3://{BUCKET}/runs/exact"
    store = open_store(store_url)
    straight = start(tmp_path, str(tmp_path / "straight"), "cache-straight")

    rng = random.Random(int(time.time()))
    stops = []
    for segment, (sig, code) in enumerate([(signal.SIGTERM, 75), (signal.SIGKILL, -signal.SIGKILL)]):
        proc = start(tmp_path, store_url, f"cache-{segment}")  # a fresh machine: nothing cached
        target = (stops[-1] if stops else 0) + 1  # wait for this segment's first commit, then stop at random
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (read_latest(store) or {}).get("step", 0) < target:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-3000:]
        stops.append(read_latest(store)["step"])
    final = start(tmp_path, store_url, "cache-final")
    _, err = final.communicate(timeout=180)
    assert final.returncode == 0, err[-3000:]
    _, err = straight.communicate(timeout=180)
    assert straight.returncode == 0, err[-3000:]

    assert stops[0] < stops[1] < 24, stops  # each segment made progress and stopped before the end
    store.get_file("final/model.safetensors", tmp_path / "resumed.safetensors")
    resumed = load_file(tmp_path / "resumed.safetensors")
    expected = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.equal(resumed[key], expected[key]), f"{key} differs after stops at steps {stops}"
