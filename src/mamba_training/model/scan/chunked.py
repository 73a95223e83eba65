"""The fast PyTorch selective scan: time in chunks, a hand-written backward, no per-step graph.

Why it is fast on a CPU (see DESIGN.md, "Mamba on CPU"): autograd through a per-step loop
records thousands of tiny nodes and, in transformers' slow path, builds a full-size zero
gradient at every step. Here the recurrence runs outside autograd, one in-place `addcmul_`
per time step, and the backward is written by hand:

    forward   h_t = a_t * h_{t-1} + u_t,   a_t = exp(dt_t A),  u_t = dt_t x_t B_t,  y_t = C_t . h_t
    backward  g_t = C_t gy_t + a_{t+1} g_{t+1}            (the same recurrence, reversed in time)
              w_t = g_t * a_t * h_{t-1}                    (gradient through a_t, times a_t)
              dA  = sum_{b,t} w_t dt_t,   d(dt_t) = sum_n A w_t + x_t (g_t . B_t),
              dB_t = sum_d g_t dt_t x_t,  dC_t = sum_d gy_t h_t,  dx_t = dt_t (g_t . B_t) + D gy_t

Memory layout, measured on a 2-core CPU:
- Every step of the work happens chunk by chunk (`chunk` time steps), including the cheap
  per-token parts (softplus, gating). Large fresh allocations cost more than the arithmetic
  (glibc hands them out as new pages, each faulted in), so only the outputs are full-length.
- Work tensors are (time, batch, d_state, d_inner): each step's slice is contiguous, and
  with d_inner innermost the contractions over d_state are well-shaped matmuls (5-8x faster
  than with d_state innermost).
The forward keeps only the state at each chunk start; the backward recomputes each chunk's
states (and the ungated output) from it, as mamba_ssm's CUDA kernel does. Every exponent is
dt * A <= 0, so nothing overflows, and the recurrence is the reference's: results match it to
rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 16
LOG2E = 1.0 / math.log(2.0)  # exp(v) = exp2(v * log2 e): torch's exp2 is ~1.7x faster than exp here


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, z, delta_bias, chunk: int):  # type: ignore[override]
        bsz, length, d_inner = x.shape
        At = A.t().contiguous()
        work = _Work(x, At, chunk)
        out = torch.empty_like(x)
        starts = x.new_empty(len(work.bounds), bsz, At.shape[0], d_inner)
        h = x.new_zeros(bsz, At.shape[0], d_inner)
        for c, (s, e) in enumerate(work.bounds):
            starts[c] = h
            pre, dt, dtx = _discretize(x, delta, delta_bias, s, e)
            hs = work.states(c, dt, dtx, B[:, s:e], start=h)
            h = hs[-1].clone()
            y = _readout(hs, C[:, s:e], x[:, s:e], D)
            if z is not None:
                torch.mul(y, F.silu(z[:, s:e]), out=out[:, s:e])
            else:
                out[:, s:e] = y
        ctx.chunk = chunk
        ctx.save_for_backward(x, delta, A, B, C, D, z, delta_bias, starts)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, delta, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        At = A.t().contiguous()
        work = _Work(x, At, ctx.chunk)
        g_x, g_delta = torch.empty_like(x), torch.empty_like(x)
        gz = torch.empty_like(z) if z is not None else None
        gB, gC = torch.empty_like(B), torch.empty_like(C)
        gA = torch.zeros_like(At)
        gD = torch.zeros_like(D) if D is not None else None
        carry = None  # a_e * g_e: what the next chunk's first step sends back into this chunk's last
        for c in range(len(work.bounds) - 1, -1, -1):
            s, e = work.bounds[c]
            pre, dt, dtx = _discretize(x, delta, delta_bias, s, e)
            hs = work.states(c, dt, dtx, B[:, s:e], start=starts[c], keep_start=True)
            gy = grad_out[:, s:e]
            if z is not None:
                y = _readout(hs[1:], C[:, s:e], x[:, s:e], D)
                sig = torch.sigmoid(z[:, s:e])
                gz[:, s:e] = gy * y * sig * (1 + z[:, s:e] * (1 - sig))
                gy = gy * z[:, s:e] * sig
            if D is not None:
                gD += (gy * x[:, s:e]).sum((0, 1))
            g, carry = work.state_grads(c, gy, C[:, s:e], carry)
            gC[:, s:e] = torch.linalg.vecdot(hs[1:], gy.transpose(0, 1)[:, :, None, :]).transpose(0, 1)
            gB[:, s:e] = torch.linalg.vecdot(g, dtx.transpose(0, 1)[:, :, None, :]).transpose(0, 1)
            q = torch.matmul(B[:, s:e].transpose(0, 1)[:, :, None, :], g).squeeze(2).transpose(0, 1)
            w = g.mul_(work.a[: e - s]).mul_(hs[:-1])  # gradient through a_t, times a_t
            dt_tm = dt.transpose(0, 1)
            gA += (w * dt_tm[:, :, None, :]).sum((0, 1))
            g_dt = torch.linalg.vecdot(w, At, dim=2).transpose(0, 1).addcmul_(x[:, s:e], q)
            torch.mul(g_dt, torch.sigmoid(pre), out=g_delta[:, s:e])
            gx = dt * q
            if D is not None:
                gx.addcmul_(gy, D)
            g_x[:, s:e] = gx
        g_bias = g_delta.sum((0, 1)) if delta_bias is not None else None
        return g_x, g_delta, gA.t(), gB, gC, gD, gz, g_bias, None


class _Work:
    """Reusable (time, batch, d_state, d_inner) buffers for one scan call, and the two recurrences."""

    def __init__(self, x: torch.Tensor, At: torch.Tensor, chunk: int):
        bsz, length, d_inner = x.shape
        self.At = At
        self.At2 = At * LOG2E
        self.bounds = [(s, min(length, s + chunk)) for s in range(0, length, chunk)]
        width = min(chunk, length)
        self.a = x.new_empty(width, bsz, At.shape[0], d_inner)
        self.h = x.new_empty(width + 1, bsz, At.shape[0], d_inner)
        self.g = torch.empty_like(self.a)

    def states(self, c, dt, dtx, B, start, keep_start=False):
        """h_t for the chunk's steps (and h before them if keep_start), from the state at its start."""
        n = dt.shape[1]
        dt_tm = dt.transpose(0, 1)[:, :, None, :]
        a = torch.exp2(torch.mul(dt_tm, self.At2, out=self.a[:n]), out=self.a[:n])
        hb = self.h[: n + 1]
        torch.mul(dtx.transpose(0, 1)[:, :, None, :], B.transpose(0, 1)[:, :, :, None], out=hb[1:])
        hb[0] = start
        prev = hb[0]
        for a_t, h_t in zip(a, hb[1:]):
            prev = h_t.addcmul_(a_t, prev)
        return hb if keep_start else hb[1:]

    def state_grads(self, c, gy, C, carry):
        """g_t = dL/dh_t for the chunk (reverse recurrence), and the carry for the chunk before."""
        n = gy.shape[1]
        a = self.a[:n]
        g = torch.mul(gy.transpose(0, 1)[:, :, None, :], C.transpose(0, 1)[:, :, :, None], out=self.g[:n])
        if carry is not None:
            g[-1].add_(carry)
        for i in range(n - 2, -1, -1):
            g[i].addcmul_(a[i + 1], g[i + 1])
        return g, a[0] * g[0]


def _discretize(x, delta, delta_bias, s, e):
    pre = delta[:, s:e] if delta_bias is None else delta[:, s:e] + delta_bias
    dt = F.softplus(pre)
    return pre, dt, dt * x[:, s:e]


def _readout(hs, C, x, D):
    """y_t = C_t . h_t + D x_t for a chunk, batch-first (batch, time, d_inner)."""
    y = torch.matmul(C.transpose(0, 1)[:, :, None, :], hs).squeeze(2).transpose(0, 1)
    return y.addcmul(x, D) if D is not None else y


def chunked_scan(x, delta, A, B, C, D=None, z=None, delta_bias=None, chunk: int = DEFAULT_CHUNK):
    """The scan of `reference.py`, fast. Half-precision inputs are computed in float32 (as
    mamba_ssm does) and the result is returned in x's dtype; autocast is off inside."""
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x, delta, B, C = x.float(), delta.float(), B.float(), C.float()
        z = z.float() if z is not None else None
    A, D, delta_bias = (t.to(x.dtype) if t is not None else None for t in (A, D, delta_bias))
    with torch.autocast(x.device.type, enabled=False):
        out = _ChunkedScan.apply(x, delta, A, B, C, D, z, delta_bias, chunk)
    return out.to(dtype)
