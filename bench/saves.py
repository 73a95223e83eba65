"""What both checkpoint benchmarks compare against: a plain synchronous `torch.save` of the model
and optimizer to local disk, the stall a trainer without async saves pays at every checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def sync_save_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, workdir: Path,
                      repeats: int = 2) -> list[float]:
    """Seconds of each of `repeats` synchronous saves (each file removed after it is timed)."""
    times = []
    for i in range(repeats):
        path = workdir / f"sync-{i}.pt"
        start = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        times.append(time.perf_counter() - start)
        path.unlink()
    return times
