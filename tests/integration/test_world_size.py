"""Same training at any size: with `train.micro_batch_size` fixed, one process and two DDP ranks
(real torchrun, gloo on loopback) take the same optimizer steps on the same global batch, so
their per-step losses agree to float tolerance; the accumulation is derived from the world
size and recorded. A micro-batch that does not fit the world size is one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SEED = 4242
STEPS = 4
TRAIN = ["model.d_model=32", "model.n_layer=1", "train.seq_len=32", "train.batch_size=8", "train.micro_batch_size=2",
         f"train.max_steps={STEPS}", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=100000",
         "train.eval_batches=1", "train.sample_tokens=0", "train.threads=1", f"train.seed={SEED}",
         "checkpoint.every_steps=1000", "spot.imds_url=off", "logging.tensorboard=false", "logging.plot=false",
         "logging.cloudwatch=off"]


def train(tmp: Path, name: str, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    sets = [*TRAIN, f"checkpoint.store={tmp / name}", f"checkpoint.cache_dir={tmp / 'cache' / name}",
            f"data.cache_dir={tmp / 'data'}", *extra]
    args = ["-m", "mamba_training", "train", "-q", *[a for s in sets for a in ("--set", s)]]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, *args], cwd=tmp, capture_output=True, text=True, timeout=300, env=env)


def records(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for p in sorted((run / "records").glob(f"*/{name}")) for line in p.read_text().splitlines()
            if line.strip()]


def test_one_process_and_two_ranks_train_the_same_steps_with_a_fixed_micro_batch(tmp_path: Path) -> None:
    print(f"seed {SEED}")
    for name, nproc in (("one", 1), ("two", 2)):
        done = train(tmp_path, name, nproc)
        assert done.returncode == 0, done.stderr[-3000:]
    losses = {name: [m["loss"] for m in sorted(records(tmp_path / name, "metrics.jsonl"), key=lambda m: m["step"])
                     if "loss" in m] for name in ("one", "two")}
    print(losses)
    assert len(losses["one"]) == len(losses["two"]) == STEPS
    assert losses["two"] == pytest.approx(losses["one"], rel=1e-4)
    starts = {name: next(e for e in records(tmp_path / name, "events.jsonl") if e["kind"] == "start")
              for name in ("one", "two")}
    # 8 sequences a step either way: 1 rank x 4 micro-batches x 2, or 2 ranks x 2 x 2.
    split = [(s["world_size"], s["grad_accum"], s["micro_batch_size"]) for s in starts.values()]
    assert split == [(1, 4, 2), (2, 2, 2)]


def test_a_micro_batch_that_does_not_fit_the_world_size_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # 8 sequences over 2 ranks are 4 each: not a whole number of micro-batches of 8 (one process would fit).
    failed = train(tmp_path, "bad", 2, "train.micro_batch_size=8")
    assert failed.returncode != 0
    errors = {line for line in failed.stderr.splitlines() if line.startswith("error:")}
    assert errors == {"error: train.batch_size 8 / (world size 2 x train.micro_batch_size 8) is not a whole number: "
                      "each rank's 4 sequences do not split into micro-batches of 8"}, failed.stderr[-3000:]
    assert "exitcode  : 2" in failed.stderr or "exitcode: 2" in failed.stderr, failed.stderr[-3000:]
