"""A strict stand-in for mamba_ssm's selective-scan kernel, for machines without a GPU.

It has the interface of `mamba_ssm.ops.selective_scan_interface.selective_scan_fn` and does what
that wrapper does before calling the compiled kernel (copy inputs whose last stride is not 1,
B and C of shape (batch, dstate, L) get a group axis), then refuses what the kernel's C++ entry
points (`csrc/selective_scan/selective_scan.cpp`, forward and backward) refuse: an input dtype
other than float32/float16/bfloat16; A other than float32; delta, B, C, z (and the backward's
dout) in a dtype other than u's; D or delta_bias other than float32; a last stride other than 1;
shapes other than u (batch, dim, L), A (dim, dstate), B/C (batch, groups, dstate, L), D and
delta_bias (dim,), dstate > 256; and any tensor not on the kernel's device (CUDA there; here the
device type the stand-in is installed for). The arithmetic is mamba_ssm's reference scan in
float32; outputs and gradients come back in the dtypes the kernel returns.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.nn.functional as F

INPUT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelCheckError(RuntimeError):
    """What TORCH_CHECK raises in the real kernel (a RuntimeError)."""


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise KernelCheckError(f"selective_scan: expected {what}")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias, device_type: str, dout=None) -> None:
    itype = u.dtype
    _check(itype in INPUT_TYPES, f"u float32/float16/bfloat16, got {itype}")
    _check(A.dtype == torch.float32, f"A float32, got {A.dtype}")
    _check(delta.dtype == itype, f"delta.dtype == u.dtype ({itype}), got {delta.dtype}")
    _check(B.dtype == itype, f"B.dtype == u.dtype ({itype}), got {B.dtype}")
    _check(C.dtype == itype, f"C.dtype == u.dtype ({itype}), got {C.dtype}")
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias, "dout": dout}
    for name, t in named.items():
        if t is not None:
            _check(t.device.type == device_type and t.device == u.device,
                   f"{name} on u's {device_type} device, got {t.device} (u on {u.device})")
    for name in ("u", "delta", "B", "C", "z", "dout"):
        t = named[name]
        if t is not None:
            _check(t.stride(-1) == 1 or t.size(-1) == 1, f"{name}.stride(-1) == 1, got {t.stride()}")
    _check(u.dim() == 3, f"u of shape (batch, dim, seqlen), got {tuple(u.shape)}")
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    _check(dstate <= 256, "dstate <= 256")
    _check(tuple(delta.shape) == (batch, dim, seqlen), f"delta of shape {(batch, dim, seqlen)}, got {tuple(delta.shape)}")
    _check(tuple(A.shape) == (dim, dstate), f"A of shape {(dim, dstate)}, got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        _check(t.dim() == 4 and tuple(t.shape) == (batch, t.shape[1], dstate, seqlen),
               f"{name} of shape (batch, groups, dstate, seqlen) = ({batch}, g, {dstate}, {seqlen}), got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _check(t.dtype == torch.float32, f"{name} float32, got {t.dtype}")
            _check(tuple(t.shape) == (dim,), f"{name} of shape ({dim},), got {tuple(t.shape)}")
    if z is not None:
        _check(z.dtype == itype, f"z.dtype == u.dtype ({itype}), got {z.dtype}")
        _check(tuple(z.shape) == (batch, dim, seqlen), f"z of shape {(batch, dim, seqlen)}, got {tuple(z.shape)}")
    if dout is not None:
        _check(dout.dtype == itype, f"dout.dtype == u.dtype ({itype}), got {dout.dtype}")
        _check(tuple(dout.shape) == (batch, dim, seqlen), f"dout of shape {(batch, dim, seqlen)}, got {tuple(dout.shape)}")


def _reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """mamba_ssm's selective_scan_ref in float32, (batch, dim, L) layout, B/C with one group."""
    u, delta, B, C = u.float(), delta.float(), B[:, 0].float(), C[:, 0].float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    h = A.new_zeros(u.shape[0], A.shape[0], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        h = deltaA[:, :, i] * h + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, i]))
    out = torch.stack(ys, dim=2)
    out = out if D is None else out + u * D[..., None]
    return out if z is None else out * F.silu(z.float())


class _Kernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, device_type):  # type: ignore[override]
        _check_inputs(u, delta, A, B, C, D, z, delta_bias, device_type)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.softplus, ctx.device_type = delta_softplus, device_type
        with torch.no_grad():
            return _reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus).to(u.dtype)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        if dout.stride(-1) != 1:  # the wrapper's backward does this before calling the kernel
            dout = dout.contiguous()
        _check_inputs(u, delta, A, B, C, D, z, delta_bias, ctx.device_type, dout=dout)
        inputs = [t.detach().requires_grad_() if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias)]
        with torch.enable_grad():
            out = _reference(*inputs, ctx.softplus)
            wanted = [t for t in inputs if t is not None]
            grads = iter(torch.autograd.grad(out, wanted, dout.float(), allow_unused=True))
        # The kernel returns du, ddelta, dz in the input dtype, dA, dB, dC, dD, d delta_bias in float32.
        in_input_dtype = (True, True, False, False, False, False, True, False)
        result = []
        for t, cast in zip(inputs, in_input_dtype):
            g = next(grads) if t is not None else None
            result.append(g.to(u.dtype) if g is not None and cast else g)
        return (*result, None, None)


def make_selective_scan_fn(device_type: str, calls: list | None = None):
    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
        if u.stride(-1) != 1:
            u = u.contiguous()
        if delta.stride(-1) != 1:
            delta = delta.contiguous()
        if D is not None:
            D = D.contiguous()
        if B.stride(-1) != 1:
            B = B.contiguous()
        if C.stride(-1) != 1:
            C = C.contiguous()
        if z is not None and z.stride(-1) != 1:
            z = z.contiguous()
        squeeze = B.dim() == 3
        if B.dim() == 3:
            B = B.unsqueeze(1)
        if C.dim() == 3:
            C = C.unsqueeze(1)
        if calls is not None:
            calls.append({"u": tuple(u.shape), "B": tuple(B.shape), "softplus": delta_softplus,
                          "dtypes": (u.dtype, delta.dtype, A.dtype, B.dtype, z.dtype if z is not None else None)})
        assert squeeze or B.dim() == 4
        return _Kernel.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, device_type)

    return selective_scan_fn


def install(monkeypatch, device_type: str = "cpu") -> list:
    """Make `mamba_ssm.ops.selective_scan_interface` importable as this stand-in; returns the
    list every call's shapes and dtypes are appended to."""
    calls: list = []
    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = make_selective_scan_fn(device_type, calls)
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", interface)
    return calls
