"""Selective-scan backends, chosen by name (a small registry, as SkyPilot chooses strategies).

Every backend computes the same function (see `reference.py` for the definition) with inputs
x, delta, z: (batch, L, d_inner); A: (d_inner, d_state); B, C: (batch, L, d_state);
D, delta_bias: (d_inner,); softplus is applied to delta + delta_bias. Under bf16 the model
hands every backend x, delta, B, C, z in one activation dtype and A, D, delta_bias in float32
(mamba_ssm's kernel requires exactly that); each computes in float32 and returns x's dtype.

- "reference": the plain loop, autograd through every step; the specification, slow.
- "chunked":   the fast PyTorch scan with a hand-written backward; on a CPU the model runs it
               inside the fused mixer (`fused.py`).
- "triton":    two Triton kernels (forward, backward); needs a CUDA GPU and triton, which
               torch's CUDA wheels bring. On a CPU only under Triton's interpreter
               (TRITON_INTERPRET=1), which is how the tests run it.
- "cuda":      mamba_ssm's fused kernel; needs a CUDA GPU and mamba_ssm installed.
- "auto":      on a GPU "cuda" when mamba_ssm is importable, else "triton" when triton is,
               else "chunked"; on a CPU "chunked".
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch

from mamba_training.errors import ModelError
from mamba_training.model.scan.chunked import chunked_scan
from mamba_training.model.scan.cuda import cuda_scan, cuda_scan_available
from mamba_training.model.scan.reference import reference_scan

ScanFn = Callable[..., torch.Tensor]


def triton_scan(x, delta, A, B, C, D=None, z=None, delta_bias=None):
    """The Triton backend, imported on first use: triton is optional, and its interpreter mode
    is chosen when the kernels are defined."""
    from mamba_training.model.scan.triton_scan import triton_scan as run

    return run(x, delta, A, B, C, D, z, delta_bias)


SCANS: dict[str, ScanFn] = {
    "chunked": chunked_scan,
    "reference": reference_scan,
    "triton": triton_scan,
    "cuda": cuda_scan,
}


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available_scans() -> list[str]:
    """Names accepted by `get_scan` (and by `MambaConfig.scan`)."""
    return ["auto", *SCANS]


def check_scan_name(name: str) -> None:
    if name not in available_scans():
        raise ModelError(f"model.scan: unknown scan {name!r}; choose one of: {', '.join(available_scans())}")


def resolve_scan_name(name: str, device: torch.device) -> str:
    """The concrete backend that `name` means for tensors on `device`; ModelError naming the
    cause and what to use instead when that backend cannot run there."""
    check_scan_name(name)
    on_gpu = device.type == "cuda"
    if name == "auto":
        if on_gpu and cuda_scan_available():
            return "cuda"
        return "triton" if on_gpu and triton_importable() else "chunked"
    if name == "cuda" and not (on_gpu and cuda_scan_available()):
        cause = f"tensors are on {device.type}" if not on_gpu else "mamba_ssm is not installed"
        raise ModelError(
            f"model.scan: 'cuda' needs a CUDA GPU and the mamba_ssm package, but {cause}; "
            f"use model.scan=auto (triton on a GPU, chunked on a CPU)"
        )
    if name == "triton" and not (triton_importable() and (on_gpu or triton_interpreted())):
        cause = f"tensors are on {device.type}" if not (on_gpu or triton_interpreted()) else "triton is not installed"
        raise ModelError(
            f"model.scan: 'triton' needs a CUDA GPU and the triton package, but {cause}; "
            f"use model.scan=auto (chunked on a CPU)"
        )
    return name


def get_scan(name: str, device: torch.device | str = "cpu") -> ScanFn:
    """The scan function for backend `name`; ModelError listing the valid names if unknown."""
    return SCANS[resolve_scan_name(name, torch.device(device))]


__all__ = [
    "SCANS", "ScanFn", "available_scans", "check_scan_name", "get_scan", "resolve_scan_name",
    "triton_importable", "triton_interpreted",
]
