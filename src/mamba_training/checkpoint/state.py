"""Capture and restore of Stateful objects as safetensors + JSON: no pickle anywhere.

Every object handed over exposes `state_dict()` / `load_state_dict()`. Their nested state (dicts,
lists, numbers, strings, tensors) is split into a JSON tree, where each tensor is replaced by a
reference, and a flat {name: tensor} map saved with safetensors. Dict keys that are not strings
are kept by encoding such dicts as key/value pairs.

The model and its optimizers go through torch.distributed.checkpoint.state_dict
(`get_model_state_dict` / `get_optimizer_state_dict` with full_state_dict=True): keys are the
parameters' fully qualified names (no DDP 'module.' prefix, optimizer state keyed by name rather
than by position), so a checkpoint restores on any world size, and an FSDP model would be gathered
by the same call. Those calls need no process group for an unsharded model.

Capture is split in two so that training blocks as little as possible: small objects (counters,
RNG, scheduler, sampler) are copied at once; model and optimizer tensors are only *referenced*
and copied later by `Snapshot.serialize()` (in the save thread), straight into the bytes of the
safetensors file. They change only inside `optimizer.step()`, which the manager holds until
that copy is done.

On a GPU that copy runs on a side stream into pinned memory: it waits only for an event recorded
when the snapshot was taken (so it sees exactly that step's tensors), overlaps the next step's
forward and backward on the compute stream, and blocks only the save thread until it is done.
"""

from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mamba_training.errors import CheckpointError

_TENSOR = "__tensor__"
_PAIRS = "__pairs__"
_TUPLE = "__tuple__"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=False)


def unwrap(module: Any) -> Any:
    """The bare module under DDP (whose own state dict keys carry a 'module.' prefix)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def find_model(app_state: dict[str, Any]) -> nn.Module | None:
    model = app_state.get("model")
    return model if isinstance(model, nn.Module) else None


def optimizers(app_state: dict[str, Any]) -> list[torch.optim.Optimizer]:
    return [obj for obj in app_state.values() if isinstance(obj, torch.optim.Optimizer)]


def _state_dict(obj: Any, model: nn.Module | None) -> Any:
    if isinstance(obj, nn.Module):
        return get_model_state_dict(obj, options=_FULL)
    # An optimizer without state yet is saved as is: get_optimizer_state_dict would run a
    # zero-lr step to create it, which changes AdamW's step counts and so the training itself.
    if isinstance(obj, torch.optim.Optimizer) and model is not None and obj.state:
        return get_optimizer_state_dict(model, obj, options=_FULL)
    return obj.state_dict()


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class Snapshot:
    """A checkpoint's content: the JSON tree, tensors already copied, and tensors still to copy."""

    tree: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    pending: dict[str, torch.Tensor] = field(default_factory=dict)
    ready: Any = None  # a torch.cuda.Event recorded at capture when pending tensors live on a GPU

    def serialize(self, reuse: torch.Tensor | None = None) -> torch.Tensor:
        """The safetensors file as one uint8 CPU tensor, each tensor copied straight into its slot.

        This is the save's only full copy of the state (from the GPU too, into pinned memory), so
        it doubles as the snapshot: after it, training may change the live tensors. `reuse`, a
        buffer from an earlier save (or allocated ahead, see CheckpointManager) at least as large,
        avoids allocating and faulting in new pages; the result is then a view of its start.
        The layout is plain safetensors (8-byte header length, JSON header, data), which
        safetensors.torch.load_file reads back; tensors are ordered by element size so every
        slot is aligned for its dtype.
        """
        everything = {**self.tensors, **self.pending}
        header: dict[str, Any] = {}
        offset = 0
        for name in sorted(everything, key=lambda n: (-everything[n].element_size(), n)):
            t = everything[name]
            if t.dtype not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"cannot save tensor {name}: dtype {t.dtype} has no safetensors type")
            size = t.numel() * t.element_size()
            header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        start = 8 + len(raw)
        pinned = any(t.is_cuda for t in everything.values())
        if reuse is not None and reuse.numel() >= start + offset and reuse.is_pinned() == pinned:
            out = reuse[:start + offset]
        else:
            out = torch.empty(start + offset, dtype=torch.uint8, pin_memory=pinned)
        out[:start] = torch.frombuffer(bytearray(struct.pack("<Q", len(raw)) + raw), dtype=torch.uint8)
        with _copy_stream(everything.values(), self.ready) as non_blocking:
            for name, t in everything.items():
                begin, end = header[name]["data_offsets"]
                if end > begin:
                    out[start + begin:start + end].view(t.dtype).view(t.shape).copy_(t.detach(), non_blocking=non_blocking)
        self.pending = {}
        self.tensors = {}
        self.ready = None
        return out


_side_streams: dict[torch.device, Any] = {}


@contextmanager
def _copy_stream(tensors: Any, ready: Any) -> Iterator[bool]:
    """Where serialize's copies run; yields whether they may be non-blocking.

    CPU tensors: the calling thread, plain copies. GPU tensors: a side stream per device that
    first waits for `ready` (the capture-time event; without one, for all work queued so far),
    and is synchronised before the context ends, so the caller sees finished bytes.
    """
    device = next((t.device for t in tensors if t.is_cuda), None)
    if device is None:
        yield False
        return
    stream = _side_streams.get(device)
    if stream is None:
        stream = _side_streams[device] = torch.cuda.Stream(device=device)
    if ready is not None:
        stream.wait_event(ready)
    else:
        stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield True
    stream.synchronize()


def estimate_bytes(app_state: dict[str, Any]) -> int:
    """About the size of the safetensors file a save of `app_state` writes, from the live tensors:
    model and optimizer state exactly, plus room for the header and the small objects' tensors."""
    total, count = 0, 0
    model = find_model(app_state)
    tensors = list(unwrap(model).state_dict().values()) if model is not None else []
    for optim in optimizers(app_state):
        tensors += [v for entry in optim.state.values() for v in entry.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        total += t.numel() * t.element_size()
        count += 1
    return total + 256 * count + (8 << 20)


def snapshot(app_state: dict[str, Any], defer_large: bool = False) -> Snapshot:
    """Encode every object's state; copy small tensors now, model/optimizer ones now or later.

    With `defer_large`, model and optimizer tensors stay references in `pending` until
    `Snapshot.serialize()`; the caller must keep them unchanged until then.
    """
    snap = Snapshot(tree={})
    model = find_model(app_state)

    def walk(value: Any, path: str, defer: bool) -> Any:
        if isinstance(value, torch.Tensor):
            if defer:
                snap.pending[path] = value
            else:
                snap.tensors[path] = value.detach().to("cpu", copy=True).contiguous()
            return {_TENSOR: path}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {k: walk(v, f"{path}/{k}", defer) for k, v in value.items()}
            return {_PAIRS: [[k, walk(v, f"{path}/{k}", defer)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {_TUPLE: [walk(v, f"{path}/{i}", defer) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{path}/{i}", defer) for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if hasattr(value, "item"):  # numpy scalars
            return value.item()
        raise CheckpointError(f"cannot save state entry {path}: unsupported type {type(value).__name__}")

    for name, obj in app_state.items():
        large = isinstance(obj, (nn.Module, torch.optim.Optimizer))
        snap.tree[name] = walk(_state_dict(obj, model), name, defer_large and large)
    gpu = next((t.device for t in snap.pending.values() if t.is_cuda), None)
    if gpu is not None:  # the point in the compute stream at which these tensors are the step's
        snap.ready = torch.cuda.Event()
        snap.ready.record(torch.cuda.current_stream(gpu))
    return snap


def rebuild(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `snapshot`'s encoding."""
    if isinstance(tree, dict):
        if _TENSOR in tree:
            try:
                return tensors[tree[_TENSOR]]
            except KeyError:
                raise CheckpointError(f"checkpoint state refers to tensor {tree[_TENSOR]} it does not hold") from None
        if _PAIRS in tree:
            return {k: rebuild(v, tensors) for k, v in tree[_PAIRS]}
        if _TUPLE in tree:
            return tuple(rebuild(v, tensors) for v in tree[_TUPLE])
        return {k: rebuild(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [rebuild(v, tensors) for v in tree]
    return tree


def snapshot_model_shapes(snap: Snapshot, app_state: dict[str, Any]) -> dict[str, list[int]]:
    """The model's tensor shapes from a snapshot taken a moment ago (no second state-dict pass)."""
    tree = snap.tree.get("model")
    if find_model(app_state) is None or not isinstance(tree, dict):
        return {}
    everything = {**snap.tensors, **snap.pending}
    return {k: list(everything[v[_TENSOR]].shape) for k, v in tree.items() if isinstance(v, dict) and _TENSOR in v}


def model_shapes(app_state: dict[str, Any]) -> dict[str, list[int]]:
    model = find_model(app_state)
    if model is None:
        return {}
    return {k: list(v.shape) for k, v in get_model_state_dict(model, options=_FULL).items()}


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


def _check_optimizer(state: dict[str, Any], shapes: dict[str, list[int]], where: str) -> None:
    """Optimizer moments must have their parameter's shape (name-keyed format only)."""
    for fqn, entry in state.get("state", {}).items():
        if not isinstance(fqn, str) or fqn not in shapes:
            continue
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim and list(value.shape) != shapes[fqn]:
                raise CheckpointError(f"checkpoint {where}: optimizer state {fqn}.{key} has shape "
                                      f"{tuple(value.shape)}, the parameter has {tuple(shapes[fqn])}")


def apply(app_state: dict[str, Any], tree: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load every object's state; call only after every file was verified and shapes checked.

    Everything is decoded first; small objects (which may reject their state) are loaded before
    the model and optimizers and rolled back if one refuses, so a failure leaves no object changed.
    """
    missing = sorted(set(app_state) - set(tree))
    if missing:
        raise CheckpointError(f"checkpoint {where} lacks state for {missing[0]!r}")
    states = {name: rebuild(tree[name], tensors) for name in app_state}
    model = find_model(app_state)
    shapes = model_shapes(app_state)
    for name, obj in app_state.items():
        if isinstance(obj, torch.optim.Optimizer):
            _check_optimizer(states[name], shapes, where)

    small = [n for n, o in app_state.items() if not isinstance(o, (nn.Module, torch.optim.Optimizer))]
    before = {n: snapshot({n: app_state[n]}) for n in small}
    loaded: list[str] = []
    try:
        for name in small:
            app_state[name].load_state_dict(states[name])
            loaded.append(name)
    except Exception as error:
        failed = name
        for done in loaded:
            app_state[done].load_state_dict(rebuild(before[done].tree[done], before[done].tensors))
        raise CheckpointError(f"checkpoint {where}: {failed} state does not load: {error}") from None

    for name, obj in app_state.items():
        if isinstance(obj, nn.Module):
            set_model_state_dict(obj, states[name], options=StateDictOptions(full_state_dict=True, strict=True))
    for name, obj in app_state.items():
        if isinstance(obj, torch.optim.Optimizer):
            _load_optimizer(obj, states[name], model)


def _load_optimizer(optim: torch.optim.Optimizer, state: dict[str, Any], model: nn.Module | None) -> None:
    groups = state.get("param_groups", [])
    by_name = any(isinstance(p, str) for g in groups for p in g.get("params", []))
    if by_name and model is not None:
        positional = _by_position(optim, state, model)
        if positional is not None:
            optim.load_state_dict(positional)
        else:
            set_optimizer_state_dict(model, optim, state, options=StateDictOptions(full_state_dict=True))
    else:
        optim.load_state_dict(state)


def _by_position(optim: torch.optim.Optimizer, state: dict[str, Any], model: nn.Module) -> dict[str, Any] | None:
    """Name-keyed optimizer state in the optimizer's own positional format, or None if names differ.

    set_optimizer_state_dict first runs a zero-learning-rate step to create the state it then
    overwrites: as long as a real step (0.7 s at 10M parameters, tens of seconds at 350M). For an
    unsharded model (plain or DDP) the names map to positions directly, and load_state_dict only
    copies. Names that do not line up (tied or wrapped parameters named differently, FSDP) take
    the set_optimizer_state_dict path.
    """
    names = {id(param): name for name, param in unwrap(model).named_parameters()}
    saved_groups = state.get("param_groups", [])
    if len(saved_groups) != len(optim.param_groups):
        return None
    position, positional_state, groups = 0, {}, []
    for saved, current in zip(saved_groups, optim.param_groups):
        current_names = [names.get(id(param)) for param in current["params"]]
        if list(saved.get("params", [])) != current_names:
            return None
        for name in current_names:
            if name in state.get("state", {}):
                positional_state[position] = state["state"][name]
            position += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"},
                       "params": list(range(position - len(current_names), position))})
    return {"state": positional_state, "param_groups": groups}
