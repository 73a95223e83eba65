"""The trainer's own Stateful: step and token counters, and the RNG state of every rank.

Only rank 0 writes checkpoints, so the ranks' RNG states are gathered to it at each save
(`TrainState.capture_rng`, a collective every rank calls). On restore each rank takes its own
state back when the world size is the one the checkpoint was written at; at another size there
is no "own" state, and each rank is seeded from (seed, step, rank) instead, so a resharded run
is still reproducible. CUDA generators are restored for the devices this machine has: a
checkpoint from an 8-GPU machine resumes on a 1-GPU (or CPU) one.
"""

from __future__ import annotations

import hashlib
import logging
import random
import struct
from typing import Any

import numpy as np
import torch

from mamba_training.train import distributed

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch and CUDA generator states, in checkpointable form."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = {str(i): s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back what `rng_state()` captured (CUDA: the devices that exist here)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda"):
        set_cuda_rng_states(state["cuda"])


def cuda_devices_to_restore(saved: list[str], device_count: int) -> list[int]:
    """The saved CUDA generator indices that exist on a machine with `device_count` GPUs."""
    return sorted(i for i in (int(k) for k in saved) if 0 <= i < device_count)


def set_cuda_rng_states(states: dict[str, torch.Tensor]) -> list[int]:
    """Restore the CUDA generators of the devices present; returns the indices restored."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    indices = cuda_devices_to_restore(list(states), count)
    if len(indices) < len(states):
        log.info("checkpoint holds %d CUDA generator states, this machine has %d devices: restoring %d",
                 len(states), count, len(indices))
    for i in indices:
        torch.cuda.set_rng_state(states[str(i)].cpu(), device=i)
    return indices


def derived_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed that depends only on (seed, step, rank)."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, step, rank), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seed_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device's generator


class TrainState:
    """Step and token counters plus every rank's RNG states."""

    def __init__(self, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.step = 0
        self.tokens_seen = 0
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._rng_ranks: list[dict[str, Any]] | None = None  # gathered at the last capture (rank 0 keeps it)

    def capture_rng(self, info: distributed.DistInfo) -> None:
        """Gather every rank's RNG state to rank 0 for the next checkpoint. A collective: every
        rank calls it at the same step."""
        gathered = distributed.all_gather_object(rng_state(), info)
        self._rng_ranks = gathered if info.is_main else None

    def state_dict(self) -> dict[str, Any]:
        ranks = self._rng_ranks if self._rng_ranks is not None else [rng_state()]
        return {"step": self.step, "tokens_seen": self.tokens_seen, "rng_ranks": ranks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        ranks = state.get("rng_ranks")
        if ranks is None and "rng_python" in state:  # a checkpoint from before per-rank RNG
            set_rng_state({"python": state["rng_python"], "numpy": state["rng_numpy"],
                           "torch": state["rng_torch"], "cuda": state.get("rng_cuda")})
        elif ranks is not None and len(ranks) == self.world_size:
            set_rng_state(ranks[self.rank])
        else:
            saved = len(ranks) if ranks is not None else "no"
            log.info("checkpoint holds RNG states of %s ranks, this run has %d: rank %d seeded from "
                     "(seed %d, step %d)", saved, self.world_size, self.rank, self.seed, self.step)
            seed_rng(derived_seed(self.seed, self.step, self.rank))


__all__ = ["TrainState", "rng_state", "set_rng_state", "set_cuda_rng_states", "cuda_devices_to_restore",
           "derived_seed", "seed_rng"]
