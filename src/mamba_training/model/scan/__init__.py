"""Selective-scan backends, chosen by name (a small registry, as SkyPilot chooses strategies).

Every backend computes the same function (see `reference.py` for the definition) with inputs
x, delta, z: (batch, L, d_inner); A: (d_inner, d_state); B, C: (batch, L, d_state);
D, delta_bias: (d_inner,); softplus is applied to delta + delta_bias.

- "reference": the plain loop, autograd through every step; the specification, slow.
- "chunked":   the fast PyTorch scan with a hand-written backward (CPU and any GPU).
- "cuda":      mamba_ssm's fused kernel; needs CUDA tensors and mamba_ssm installed.
- "auto":      "cuda" when its kernel is importable and the tensors are on a GPU, else "chunked".
"""

from __future__ import annotations

from typing import Callable

import torch

from mamba_training.errors import ModelError
from mamba_training.model.scan.chunked import chunked_scan
from mamba_training.model.scan.cuda import cuda_scan, cuda_scan_available
from mamba_training.model.scan.reference import reference_scan

ScanFn = Callable[..., torch.Tensor]

SCANS: dict[str, ScanFn] = {
    "chunked": chunked_scan,
    "reference": reference_scan,
    "cuda": cuda_scan,
}


def available_scans() -> list[str]:
    """Names accepted by `get_scan` (and by `MambaConfig.scan`)."""
    return ["auto", *SCANS]


def check_scan_name(name: str) -> None:
    if name not in available_scans():
        raise ModelError(f"model.scan: unknown scan {name!r}; choose one of: {', '.join(available_scans())}")


def resolve_scan_name(name: str, device: torch.device) -> str:
    """The concrete backend that `name` means for tensors on `device`."""
    check_scan_name(name)
    if name == "auto":
        return "cuda" if device.type == "cuda" and cuda_scan_available() else "chunked"
    if name == "cuda" and (device.type != "cuda" or not cuda_scan_available()):
        raise ModelError(
            f"model.scan: 'cuda' needs a GPU and the mamba_ssm package (extra 'cuda'); "
            f"tensors are on {device.type}, mamba_ssm importable: {cuda_scan_available()}. Use 'auto' or 'chunked'."
        )
    return name


def get_scan(name: str, device: torch.device | str = "cpu") -> ScanFn:
    """The scan function for backend `name`; ModelError listing the valid names if unknown."""
    return SCANS[resolve_scan_name(name, torch.device(device))]


__all__ = ["SCANS", "ScanFn", "available_scans", "check_scan_name", "get_scan", "resolve_scan_name"]
