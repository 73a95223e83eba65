"""Checkpoints move between world sizes: saved by 1 process, resumed by 2 DDP ranks (torchrun, gloo,
CPU), which save again; that checkpoint restores on 1 process. Full state dicts make this exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mamba_training.checkpoint import CheckpointManager
from tests.checkpoint.reshard_worker import digest
from tests.checkpoint.tiny import build, train

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "checkpoint" / "reshard_worker.py"


def torchrun(*args: str) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([*launcher, str(WORKER), *args], capture_output=True, text=True, timeout=180,
                            cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-4000:]


def test_one_process_to_two_ranks_and_back(tmp_path: Path) -> None:
    store = str(tmp_path / "run")
    single = build(seed=3)
    torch.manual_seed(100)
    train(single, 3)
    mgr = CheckpointManager(store, cache_dir=tmp_path / "cache")
    mgr.save(3, single["trainer"].tokens_seen, single)
    mgr.flush()
    saved_by_one = digest(single)

    torchrun("--store", store, "--mode", "resume", "--steps", "2", "--out", str(tmp_path / "ddp"))
    ranks = [json.loads((tmp_path / f"ddp.{rank}.json").read_text()) for rank in (0, 1)]
    for report in ranks:
        assert (report["restored_step"], report["restored_from_world"], report["world_size"]) == (3, 1, 2)
        assert report["restored"] == saved_by_one
    assert ranks[0]["saved"] == ranks[1]["saved"] and ranks[0]["saved_step"] == 5

    back = build(seed=3)
    info = CheckpointManager(store, cache_dir=tmp_path / "cache-back").restore(back)
    assert (info.step, info.world_size) == (5, 2)
    assert digest(back) == ranks[0]["saved"]
