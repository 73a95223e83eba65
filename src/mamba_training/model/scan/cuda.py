"""The CUDA selective scan: mamba_ssm's fused kernel, when that optional package is importable.

mamba_ssm is imported lazily and never required: it has no CPU wheels, and once importable it
changes how transformers' Mamba runs (docs/design.md, "Measured facts"). Its layout is (batch, channels, time); ours
is (batch, time, channels), so inputs are transposed on the way in and out (its wrapper copies
them to a unit last stride). Its C++ entry point requires u, delta, B, C and z in one dtype and
A, D, delta_bias in float32: the model hands them over that way (mamba.py).
"""

from __future__ import annotations

import functools
import importlib.util

import torch


def cuda_scan_available() -> bool:
    """True when mamba_ssm's selective-scan kernel can be imported and a GPU is present."""
    return torch.cuda.is_available() and _mamba_ssm_importable()


@functools.lru_cache(maxsize=None)  # asked at every layer's forward: look on sys.path once
def _mamba_ssm_importable() -> bool:
    try:
        return importlib.util.find_spec("mamba_ssm.ops.selective_scan_interface") is not None
    except (ImportError, ValueError):  # find_spec imports the parent package, which may fail to load
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
