"""Process-group setup from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), like nanoGPT.

On GPUs gradients go over NCCL; the small control collectives (the per-step stop decision, the
logged loss, the RNG gather, barriers) go over a second, gloo group on CPU tensors, so deciding whether
to stop never waits for the GPU to drain its queue of kernels (an NCCL all-reduce read back with
`.item()` would, every step).

Timeouts: every collective of a step (gradients, the stop decision, the logged loss, the RNG
gather) runs with `train.collective_timeout_s` (60 s by default), so a peer that vanishes without
a TCP reset (a frozen instance, a cut network) fails the survivors' next collective within that
bound and their launcher re-forms the run. The few places where ranks wait while one of them
does slow work alone (rank 0 preparing the corpus, committing and uploading a checkpoint, writing
the final model; restores of unequal speed) meet in `wait_for_all`, a barrier on a third, gloo
group with `train.long_wait_timeout_s`, so a big checkpoint never trips the short timeout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from mamba_training.errors import ConfigError, MambaTrainingError


# How gloo words a peer that stopped answering (its timeout) or went away (a reset): torch raises
# these as plain RuntimeErrors, from our collectives and from DDP's gradient all-reduce alike.
_PEER_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer")


class PeerLost(MambaTrainingError):
    """A collective failed because another rank stopped answering or went away (exit 1: the
    launcher re-forms the run, which resumes from the last commit)."""


def peer_lost(error: RuntimeError, collective_timeout_s: float) -> PeerLost | None:
    """The error as a PeerLost naming the timeout, or None when it is not a lost peer."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not any(marker in first for marker in _PEER_FAILURES):
        return None
    return PeerLost(f"a peer stopped answering or went away (train.collective_timeout_s {collective_timeout_s:g}s): "
                    f"{first.split('] ', 1)[-1]}")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control: Any = None  # the gloo group for control all-reduces when gradients use NCCL
    waits: Any = None  # the gloo group with the long timeout, for wait_for_all

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(setting: str, local_rank: int) -> torch.device:
    """auto: this rank's GPU when CUDA is available, else the CPU."""
    if setting == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ConfigError(f"config key train.device: unknown device {setting!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key train.device: {setting!r} requested but CUDA is not available")
    return device


def backends(device_type: str) -> tuple[str, str | None]:
    """(gradient backend, control backend or None when the gradient group serves both)."""
    return ("nccl", "gloo") if device_type == "cuda" else ("gloo", None)


def setup(device_setting: str = "auto", collective_timeout_s: float = 60.0,
          long_wait_timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group when launched by torchrun; a single process otherwise.

    Joining is bounded by `collective_timeout_s` too: every rank must arrive within it (the
    launcher starts them together after its rendezvous). A rank that does not fails the join,
    and the launcher restarts the round.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_setting, local_rank)
    control = waits = None
    if world_size > 1 and not dist.is_initialized():
        backend, control_backend = backends(device.type)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        short = timedelta(seconds=collective_timeout_s)
        dist.init_process_group(backend=backend, timeout=short)
        if control_backend is not None:
            control = dist.new_group(backend=control_backend, timeout=short)
        waits = dist.new_group(backend="gloo", timeout=timedelta(seconds=long_wait_timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, control=control,
                    waits=waits)


def _control_tensor(value: float, info: DistInfo) -> torch.Tensor:
    device = "cpu" if info.control is not None else info.device
    return torch.tensor([value], dtype=torch.float64, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_max(value: float, info: DistInfo) -> float:
    """The largest `value` over all ranks (used so every rank takes the same stop decision)."""
    if not info.enabled:
        return value
    tensor = _control_tensor(value, info)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=info.control)
    return float(tensor.item())


def all_reduce_max_vector(values: list[float], info: DistInfo) -> list[float]:
    """The element-wise largest `values` over all ranks, in one small all-reduce (negate an
    entry to get its minimum)."""
    if not info.enabled:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device="cpu" if info.control is not None else info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=info.control)
    return [float(v) for v in tensor.tolist()]


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, indexed by rank (picklable objects; meant for small state like RNG)."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj, group=info.control)
    return gathered


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if not info.enabled:
        return value
    tensor = _control_tensor(value, info)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=info.control)
    return float(tensor.item()) / info.world_size


def wait_for_all(info: DistInfo) -> None:
    """Block until every rank is here, for up to `train.long_wait_timeout_s`: where a rank waits
    while another does slow work alone (a short-timeout barrier there would fail the run)."""
    if info.enabled:
        dist.barrier(group=info.waits)
