"""Capture and restore of Stateful objects as safetensors + JSON: no pickle anywhere.

Every object handed over exposes `state_dict()` / `load_state_dict()`. Their nested state (dicts,
lists, numbers, strings, tensors) is split into a JSON tree, where each tensor is replaced by a
reference, and a flat {name: tensor} map saved with safetensors. Dict keys that are not strings
(optimizer state is keyed by int) are kept by encoding such dicts as key/value pairs.

DDP replicates the full model and optimizer on every rank, so rank 0's state dicts are complete
and a checkpoint restores on any world size (resharding is trivial without FSDP). If sharded
training is added, gather with torch.distributed.checkpoint.state_dict.get_state_dict(...,
full_state_dict=True) here and nothing else changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mamba_training.errors import CheckpointError

_TENSOR = "__tensor__"
_PAIRS = "__pairs__"
_TUPLE = "__tuple__"


def unwrap(module: Any) -> Any:
    """The bare module under DDP (whose state dict keys carry a 'module.' prefix)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def snapshot(app_state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Copy every object's state to CPU memory now; returns (json_tree, tensors).

    This is the only part of a save that blocks training.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR: path}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {k: walk(v, f"{path}/{k}") for k, v in value.items()}
            return {_PAIRS: [[k, walk(v, f"{path}/{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {_TUPLE: [walk(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if hasattr(value, "item"):  # numpy scalars
            return value.item()
        raise CheckpointError(f"cannot save state entry {path}: unsupported type {type(value).__name__}")

    tree = {name: walk(unwrap(obj).state_dict(), name) for name, obj in app_state.items()}
    return tree, tensors


def rebuild(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `snapshot`'s encoding."""
    if isinstance(tree, dict):
        if _TENSOR in tree:
            return tensors[tree[_TENSOR]]
        if _PAIRS in tree:
            return {k: rebuild(v, tensors) for k, v in tree[_PAIRS]}
        if _TUPLE in tree:
            return tuple(rebuild(v, tensors) for v in tree[_TUPLE])
        return {k: rebuild(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [rebuild(v, tensors) for v in tree]
    return tree


def model_shapes(app_state: dict[str, Any]) -> dict[str, list[int]]:
    model = app_state.get("model")
    if model is None:
        return {}
    return {k: list(v.shape) for k, v in unwrap(model).state_dict().items()}


def check_shapes(saved: dict[str, list[int]], current: dict[str, list[int]], where: str) -> None:
    """Refuse a checkpoint whose model does not have the configured shape, naming the tensor."""
    for name, shape in current.items():
        if name not in saved:
            raise CheckpointError(f"checkpoint {where} has no tensor {name}: it was saved by another model")
        if list(saved[name]) != list(shape):
            raise CheckpointError(
                f"checkpoint {where} does not fit the configured model: {name} has shape "
                f"{tuple(saved[name])} there but {tuple(shape)} here"
            )
    extra = sorted(set(saved) - set(current))
    if extra:
        raise CheckpointError(f"checkpoint {where} has tensor {extra[0]} the configured model lacks")


def apply(app_state: dict[str, Any], tree: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Load every object's state. Call only after everything was read and verified."""
    missing = sorted(set(app_state) - set(tree))
    if missing:
        raise CheckpointError(f"checkpoint lacks state for {missing[0]!r}")
    for name, obj in app_state.items():
        state = rebuild(tree[name], tensors)
        target = unwrap(obj)
        if isinstance(target, nn.Module):
            target.load_state_dict(state, strict=True)
        else:
            target.load_state_dict(state)
