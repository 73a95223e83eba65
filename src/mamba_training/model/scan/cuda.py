"""The CUDA selective scan: mamba_ssm's fused kernel, when that optional package is importable.

mamba_ssm is imported lazily and never required: it has no CPU wheels, and once importable it
changes how transformers' Mamba runs (docs/design.md, "Measured facts"). Its layout is (batch, channels, time); ours
is (batch, time, channels), so inputs are transposed on the way in and out.
"""

from __future__ import annotations

import importlib.util

import torch


def cuda_scan_available() -> bool:
    """True when mamba_ssm's selective-scan kernel can be imported and a GPU is present."""
    if not torch.cuda.is_available():
        return False
    try:
        return importlib.util.find_spec("mamba_ssm.ops.selective_scan_interface") is not None
    except ImportError:  # find_spec imports the parent package, which may fail to load
        return False


def cuda_scan(x, delta, A, B, C, D=None, z=None, delta_bias=None):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    y = selective_scan_fn(
        x.transpose(1, 2),
        delta.transpose(1, 2),
        A,
        B.transpose(1, 2),
        C.transpose(1, 2),
        D=D,
        z=z.transpose(1, 2) if z is not None else None,
        delta_bias=delta_bias,
        delta_softplus=True,
    )
    return y.transpose(1, 2)
