"""Batches of token windows: a deterministic, resumable training sampler and fixed eval windows.

Training windows are drawn at random offsets, and "random" is a pure function: row `i` of the
global batch of step `s` starts at `blake2b(seed, s, i) mod (tokens - seq_len)`. So
- the global batch of a step depends only on (seed, step), never on what came before;
- resuming needs only the step (state: seed, step, tokens consumed — plain JSON);
- rank `r` of `w` takes rows [r*b/w, (r+1)*b/w) of the same global batch, so ranks read
  disjoint slices, and a run resumed on a different number of ranks sees the same data;
- it does not depend on a library's random number generator staying the same across versions.
Windows are sampled with replacement (as nanoGPT does); there are no epochs to track.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from typing import Any

import numpy as np
import torch

from mamba_training.data.dataset import TokenDataset
from mamba_training.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def window_offset(seed: int, step: int, row: int, n_starts: int) -> int:
    """Start of row `row` of step `step`'s global batch: a hash, reduced to [0, n_starts)."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, step, row), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_starts


class BatchSampler:
    """Yields (x, y) LongTensors of shape (batch_size // world_size, seq_len); y is x shifted by one."""

    def __init__(
        self, dataset: TokenDataset, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not within world size {world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise ConfigError(
                f"train.batch_size {batch_size} must be a positive multiple of the world size {world_size}"
            )
        _check_long_enough(dataset, seq_len)
        self.dataset, self.seq_len, self.batch_size = dataset, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.local_batch = batch_size // world_size
        self.step = 0
        self.tokens_consumed = 0

    def batch_offsets(self, step: int) -> list[int]:
        """Window starts of this rank's rows of the global batch of `step`."""
        n_starts = len(self.dataset) - self.seq_len
        first = self.rank * self.local_batch
        return [window_offset(self.seed, step, row, n_starts) for row in range(first, first + self.local_batch)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.dataset.window(o, self.seq_len + 1) for o in self.batch_offsets(self.step)]
        self.step += 1
        self.tokens_consumed += self.batch_size * self.seq_len
        return _to_xy(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": int(self.seed), "step": int(self.step), "tokens_consumed": int(self.tokens_consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            seed, step, tokens = int(state["seed"]), int(state["step"]), int(state["tokens_consumed"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"sampler state {state!r} is malformed: {error}") from None
        if seed != self.seed:
            # Resuming continues the stream the run was on, so the saved seed wins.
            log.warning("sampler seed %d from the checkpoint replaces the configured %d", seed, self.seed)
        self.seed, self.step, self.tokens_consumed = seed, step, tokens


def eval_batches(
    dataset: TokenDataset, seq_len: int, batch_size: int, n_batches: int, seed: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n_batches` fixed (x, y) batches of `batch_size` windows, evenly spaced over the split.

    Even spacing covers the whole split with less variance than random windows; `seed` only
    shifts where the first window starts, within one stride.
    """
    _check_long_enough(dataset, seq_len)
    n_windows = batch_size * n_batches
    n_starts = len(dataset) - seq_len
    stride = n_starts / n_windows
    phase = window_offset(seed, -1, 0, max(1, int(stride)))
    offsets = [min(n_starts - 1, phase + int(k * stride)) for k in range(n_windows)]
    rows = [dataset.window(o, seq_len + 1) for o in offsets]
    return [_to_xy(rows[b * batch_size:(b + 1) * batch_size]) for b in range(n_batches)]


def _to_xy(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(np.stack(rows))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _check_long_enough(dataset: TokenDataset, seq_len: int) -> None:
    if seq_len < 1:
        raise ConfigError(f"train.seq_len {seq_len} must be at least 1")
    if len(dataset) < seq_len + 1:
        raise DataError(
            f"split {dataset.split!r} of {dataset.dir} has {len(dataset)} tokens, fewer than seq_len + 1 = {seq_len + 1}"
        )
