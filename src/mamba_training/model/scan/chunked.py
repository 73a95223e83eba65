"""The fast PyTorch selective scan: time in chunks, a hand-written backward, no per-step graph.

Why it is fast on a CPU (docs/design.md, "Measured facts the code relies on"): autograd
through a per-step loop records thousands of tiny nodes and, in transformers' slow path,
builds a full-size zero gradient at every step. Here the recurrence runs outside autograd, one in-place `addcmul_`
per time step, and the backward is written by hand:

    forward   h_t = a_t * h_{t-1} + u_t,   a_t = exp(dt_t A),  u_t = dt_t x_t B_t,  y_t = C_t . h_t
    backward  g_t = C_t gy_t + a_{t+1} g_{t+1}            (the same recurrence, reversed in time)
              w_t = g_t * a_t * h_{t-1}                    (gradient through a_t, times a_t)
              dA  = sum_{b,t} w_t dt_t,   d(dt_t) = sum_n A w_t + x_t (g_t . B_t),
              dB_t = sum_d g_t dt_t x_t,  dC_t = sum_d gy_t h_t,  dx_t = dt_t (g_t . B_t) + D gy_t

Memory layout, measured on a 2-core CPU:
- All work happens chunk by chunk (`chunk` time steps), the cheap per-token parts included.
  Large fresh allocations cost more than the arithmetic here (glibc hands them out as new
  pages, each one faulted in), so only inputs and outputs are full-length; the work buffers
  are allocated once per call and stay cache-sized.
- Work tensors are (time, batch, d_state, d_inner): each step's slice is contiguous, and with
  d_inner innermost the contractions over d_state are well-shaped matmuls (5-8x faster than
  with d_state innermost).
- exp(v) is computed as exp2(v * log2 e): torch's exp2 is ~1.7x faster than its exp here.
The forward keeps only the state at each chunk start; the backward recomputes each chunk's
states from it, as mamba_ssm's CUDA kernel does. Every exponent is dt * A <= 0, so nothing
overflows, and the recurrence is the reference's: results match it to rounding.

`ScanChunks` is the chunk-level engine; `fused.py` drives it inside the fused mixer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 16
LOG2E = 1.0 / math.log(2.0)
SERIAL_GRAIN = 32768  # at::internal::GRAIN_SIZE: smaller elementwise ops run on the calling thread


class ScanChunks:
    """Buffers and recurrences for one scan over chunks; forward in time, backward in reverse.

    Inputs per chunk are batch-first (batch, T, ...) tensors: dt = softplus(delta + bias),
    dtx = dt * x, B and C (batch, T, d_state). `A` is (d_inner, d_state).
    """

    def __init__(self, A: torch.Tensor, bsz: int, length: int, chunk: int):
        d_inner, d_state = A.shape
        self.At = A.t().contiguous()  # (d_state, d_inner)
        self.At2 = self.At * LOG2E
        self.bounds = [(s, min(length, s + chunk)) for s in range(0, length, chunk)]
        width = min(chunk, length)
        self.a = A.new_empty(width, bsz, d_state, d_inner)
        self.h = A.new_empty(width + 1, bsz, d_state, d_inner)
        self.g = torch.empty_like(self.a)
        self.tmp = torch.empty_like(self.a)
        self.carry_buf = A.new_empty(bsz, d_state, d_inner)
        self.gA = torch.zeros_like(self.At)
        self.carry: torch.Tensor | None = None  # a_e * g_e: sent back into the previous chunk's last step
        self.pieces = _serial_pieces(bsz, d_state, d_inner)

    def new_state(self) -> torch.Tensor:
        return self.h.new_zeros(self.h.shape[1:])

    def forward_chunk(self, dt, dtx, B, C, start):
        """(C . h_t for the chunk (batch, T, d_inner), the state after its last step)."""
        hs = self._states(dt, dtx, B, start)[1:]
        return _contract_state(C, hs), hs[-1].clone()

    def recompute(self, dt, dtx, B, C, start):
        """Redo a chunk's forward for its backward: (C . h_t (batch, T, d_inner), states)."""
        hb = self._states(dt, dtx, B, start)
        return _contract_state(C, hb[1:]), hb

    def backward_chunk(self, hb, dt, dtx, x, B, C, gy):
        """Gradients for one chunk, walking chunks last to first, right after `recompute`.

        gy is d loss / d (C . h). Returns (d x, d dt, d B, d C) for the chunk and accumulates
        d A in `self.gA`.
        """
        n = dt.shape[1]
        a = self.a[:n]
        gy_tm = gy.transpose(0, 1)
        g = torch.mul(gy_tm[:, :, None, :], C.transpose(0, 1)[:, :, :, None], out=self.g[:n])
        if self.carry is not None:
            g[-1].add_(self.carry)
        for piece in self.pieces:
            g_p, a_p = g[(slice(None), *piece)], a[(slice(None), *piece)]
            for i in range(n - 2, -1, -1):
                g_p[i].addcmul_(a_p[i + 1], g_p[i + 1])
        self.carry = torch.mul(a[0], g[0], out=self.carry_buf)
        tmp = self.tmp[:n]  # every product below lands in this buffer: no fresh chunk-sized tensors
        gC = torch.mul(hb[1:], gy_tm[:, :, None, :], out=tmp).sum(-1).transpose(0, 1)
        gB = torch.mul(g, dtx.transpose(0, 1)[:, :, None, :], out=tmp).sum(-1).transpose(0, 1)
        q = _contract_state(B, g)  # (batch, T, d_inner): g_t . B_t
        w = g.mul_(a).mul_(hb[:-1])  # gradient through a_t, times a_t
        self.gA += torch.mul(w, dt.transpose(0, 1)[:, :, None, :], out=tmp).sum((0, 1))
        g_dt = torch.mul(w, self.At, out=tmp).sum(2).transpose(0, 1).addcmul_(x, q)
        return dt * q, g_dt, gB, gC

    def grad_A(self) -> torch.Tensor:
        return self.gA.t()

    def _states(self, dt, dtx, B, start):
        """(h_{start}, h_1, ..., h_T) for the chunk, time-major, in the reusable buffer."""
        n = dt.shape[1]
        a = torch.mul(dt.transpose(0, 1)[:, :, None, :], self.At2, out=self.a[:n])
        torch.exp2(a, out=a)
        hb = self.h[: n + 1]
        torch.mul(dtx.transpose(0, 1)[:, :, None, :], B.transpose(0, 1)[:, :, :, None], out=hb[1:])
        hb[0] = start
        for piece in self.pieces:
            h_p, a_p = hb[(slice(None), *piece)], a[(slice(None), *piece)]
            for t in range(n):
                h_p[t + 1].addcmul_(a_p[t], h_p[t])
        return hb


def _serial_pieces(bsz: int, d_state: int, d_inner: int) -> list[tuple[slice, slice, slice]]:
    """(batch, d_state, d_inner) slices of the state small enough that torch runs each step's
    op on one thread (below its parallel grain of 32768 elements).

    The time loops are thousands of small ops; spread over threads, each one ends in a barrier,
    and on a busy machine every barrier can wait a whole scheduler slice for a descheduled
    thread (measured: 7x slower training steps). Serial pieces cost ~1.5x on the loops when the
    machine is idle, a few percent of a step.
    """
    row = d_state * d_inner
    if row <= SERIAL_GRAIN:
        rows = max(1, SERIAL_GRAIN // row)
        return [(slice(b, min(bsz, b + rows)), slice(None), slice(None)) for b in range(0, bsz, rows)]
    cols = max(1, SERIAL_GRAIN // d_state)
    return [(slice(b, b + 1), slice(None), slice(d, min(d_inner, d + cols)))
            for b in range(bsz) for d in range(0, d_inner, cols)]


def _contract_state(C: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
    """sum_n C[b,t,n] hs[t,b,n,d] -> (batch, T, d_inner)."""
    return torch.matmul(C.transpose(0, 1)[:, :, None, :], hs).squeeze(2).transpose(0, 1)


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, z, delta_bias, chunk: int):  # type: ignore[override]
        engine = ScanChunks(A, x.shape[0], x.shape[1], chunk)
        out = torch.empty_like(x)
        starts = x.new_empty(len(engine.bounds), *engine.h.shape[1:])
        h = engine.new_state()
        for c, (s, e) in enumerate(engine.bounds):
            starts[c] = h
            _, dt, dtx = _discretize(x, delta, delta_bias, s, e)
            y, h = engine.forward_chunk(dt, dtx, B[:, s:e], C[:, s:e], h)
            if D is not None:
                y.addcmul_(x[:, s:e], D)
            out[:, s:e] = y * F.silu(z[:, s:e]) if z is not None else y
        ctx.chunk = chunk
        ctx.save_for_backward(x, delta, A, B, C, D, z, delta_bias, starts)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, delta, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        engine = ScanChunks(A, x.shape[0], x.shape[1], ctx.chunk)
        g_x, g_delta = torch.empty_like(x), torch.empty_like(x)
        gz = torch.empty_like(z) if z is not None else None
        gB, gC = torch.empty_like(B), torch.empty_like(C)
        gD = torch.zeros_like(D) if D is not None else None
        for c in range(len(engine.bounds) - 1, -1, -1):
            s, e = engine.bounds[c]
            pre, dt, dtx = _discretize(x, delta, delta_bias, s, e)
            gy = grad_out[:, s:e]
            y, hb = engine.recompute(dt, dtx, B[:, s:e], C[:, s:e], starts[c])
            if z is not None:
                if D is not None:
                    y.addcmul_(x[:, s:e], D)
                sig = torch.sigmoid(z[:, s:e])
                gz[:, s:e] = gy * y * sig * (1 + z[:, s:e] * (1 - sig))
                gy = gy * z[:, s:e] * sig
            gx, g_dt, gB[:, s:e], gC[:, s:e] = engine.backward_chunk(hb, dt, dtx, x[:, s:e], B[:, s:e], C[:, s:e], gy)
            if D is not None:
                gD += (gy * x[:, s:e]).sum((0, 1))
                gx.addcmul_(gy, D)
            g_x[:, s:e] = gx
            torch.mul(g_dt, torch.sigmoid(pre), out=g_delta[:, s:e])
        g_bias = g_delta.sum((0, 1)) if delta_bias is not None else None
        return g_x, g_delta, engine.grad_A(), gB, gC, gD, gz, g_bias, None


def _discretize(x, delta, delta_bias, s, e):
    pre = delta[:, s:e] if delta_bias is None else delta[:, s:e] + delta_bias
    dt = F.softplus(pre)
    return pre, dt, dt * x[:, s:e]


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
