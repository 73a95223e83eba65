"""Mixed precision: which autocast dtype a run uses on its device, decided once at start-up.

train.amp: "auto" is bf16 autocast on a GPU that supports bfloat16, and float32 elsewhere (on a
CPU bf16 is slower than float32 for this model); "bf16" asks for bf16 autocast on any device,
the CPU included (the same dtype flow as on a GPU, which the CPU tests exercise); "off" is
float32. Parameters, optimizer state and the residual stream stay float32 either way.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from mamba_training.errors import ConfigError


def autocast_dtype(setting: str, device_type: str, bf16_supported: bool, device_name: str = "") -> torch.dtype | None:
    """The autocast dtype for `setting` on a device of `device_type`, or None for float32."""
    if setting == "off":
        return None
    if setting == "auto":
        return torch.bfloat16 if device_type == "cuda" and bf16_supported else None
    if setting == "bf16":
        if device_type == "cuda" and not bf16_supported:
            raise ConfigError(
                f"train.amp=bf16: this GPU{f' ({device_name})' if device_name else ''} has no bfloat16 support; "
                "use train.amp=off (float32), or auto"
            )
        return torch.bfloat16
    raise ConfigError(f"train.amp: unknown value {setting!r}; choose one of: auto, bf16, off")


def autocast_for(setting: str, device: torch.device) -> AbstractContextManager:
    """The context a forward pass runs in; ConfigError when the device cannot do what is asked."""
    cuda = device.type == "cuda"
    dtype = autocast_dtype(setting, device.type, torch.cuda.is_bf16_supported() if cuda else True,
                           torch.cuda.get_device_name(device) if cuda else "")
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
