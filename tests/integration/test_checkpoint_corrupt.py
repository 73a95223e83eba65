"""A corrupted latest checkpoint does not crash-loop the run (`python -m mamba_training train`, local
and S3 on the moto server): the resume falls back to the newest checkpoint that verifies, says which
and why in one log line, commits the steps after it (superseding the unverifiable one) and ends
with latest.json naming the last step; every checkpoint left verifies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mamba_training.checkpoint import list_checkpoints, open_store, read_latest, verify_checkpoint
from tests.checkpoint.conftest import BUCKET, make_bucket

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "model.d_model=32", "model.n_layer=2", "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=2",
    "train.eval_every=1000", "train.eval_batches=1", "train.log_every=20", "train.sample_tokens=0",
    "train.threads=1", "checkpoint.every_steps=20", "checkpoint.keep_last=3", "spot.imds_url=off",
    "logging.cloudwatch=off",
]


def train(tmp: Path, store: str, max_steps: int) -> subprocess.CompletedProcess:
    sets = [*SMALL, f"train.max_steps={max_steps}", f"checkpoint.store={store}",
            f"data.cache_dir={tmp / 'data-cache'}", f"checkpoint.cache_dir={tmp / f'cache-{max_steps}'}"]
    cmd = [sys.executable, "-m", "mamba_training", "train", "-c", str(REPO / "configs" / "tiny.yaml"),
           *[a for s in sets for a in ("--set", s)]]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_corrupted_latest_is_superseded_and_the_run_reaches_its_last_step(where: str, request, tmp_path: Path) -> None:
    if where == "s3":
        request.getfixturevalue("aws")
        make_bucket()
        url = f"s3://{BUCKET}/runs/corrupt"
    else:
        url = str(tmp_path / "run")
    first = train(tmp_path, url, 60)
    assert first.returncode == 0, first.stderr[-3000:]
    store = open_store(url)
    assert read_latest(store)["step"] == 60
    prefix = "checkpoints/step_00000060"
    key = f"{prefix}/{json.loads(store.get_bytes(f'{prefix}/manifest.json'))['tensors']}"
    data = bytearray(store.get_bytes(key))
    data[1000:1008] = b"XXXXXXXX"  # a few bytes overwritten: same size, another sha256
    store.put_bytes(key, bytes(data))

    resumed = train(tmp_path, url, 100)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = [line for line in resumed.stderr.splitlines() if "the newest that verifies" in line]
    assert len(lines) == 1, resumed.stderr[-3000:]
    assert "step_00000040, the newest that verifies: step 60 skipped" in lines[0] and "sha256" in lines[0]
    assert "already committed" not in resumed.stderr
    assert read_latest(store)["step"] == 100
    left = [s.step for s in list_checkpoints(store)]
    assert left == [100, 80, 60], left  # keep_last=3; step 60 is the superseding one
    for step in left:
        verify_checkpoint(store, step, tmp_path / "verify")
    assert not store.exists(key)  # the corrupted file went with the manifest that named it
