"""AdamW with decoupled weight decay on matrices only, and a linear-warmup cosine schedule.

On CUDA the update is torch's fused AdamW (one kernel for every parameter instead of a dozen
small kernels per parameter); on a CPU it is the plain per-parameter loop, whose fixed update
order keeps CPU runs bitwise reproducible.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mamba_training.config import TrainConfig

# Parameters that must not decay: norms, biases, and the SSM's A_log / D (as mamba_ssm does).
_NO_DECAY_SUFFIXES = ("bias", "norm.weight", "norm_f.weight", "A_log", "D")


def adamw_implementation(device_type: str) -> dict[str, bool]:
    """AdamW's implementation flags for parameters on `device_type`."""
    if device_type == "cuda":
        return {"fused": True}
    return {"foreach": False}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(_NO_DECAY_SUFFIXES) or param.ndim < 2 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    device_types = {p.device.type for group in groups for p in group["params"]}
    device_type = device_types.pop() if len(device_types) == 1 else "mixed"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **adamw_implementation(device_type))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier on the peak lr at `step`: linear warmup, then cosine down to min_lr_ratio."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
