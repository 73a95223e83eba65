"""The fused Mamba mixer for CPU: everything between in_proj and out_proj in one autograd node.

mamba_ssm fuses the same span on GPU (`mamba_inner_fn`). On a CPU the win is memory traffic:
run through autograd op by op, each layer would materialise a dozen full-length
(batch, L, d_inner) intermediates and as many gradients, and on this kind of machine a fresh
large allocation costs more than the arithmetic on it (every page is faulted in). Here the
whole span runs chunk by chunk over time with cache-sized temporaries:

    x, z = xz                      (in_proj output, batch-first)
    x    = silu(causal depthwise conv(x))
    dt_low, B, C = x @ x_proj^T
    dt   = softplus(dt_low @ dt_proj^T + dt_bias)
    y    = selective_scan(x, dt, A, B, C) + D x          (scan/chunked.py's ScanChunks)
    out  = (y * silu(z)) @ out_proj^T

and the backward walks the chunks last to first, recomputing each chunk's activations from xz
and the saved state at its start. Only xz, the output and the gradients are full-length.
Parameter gradients accumulate over chunks with in-place matmuls.

Threads: the batch is split into torch.get_num_threads() parts run side by side on a small
thread pool, each with single-threaded ops (`in_batch_parts`), rather than letting every small
op fork and join torch's OpenMP team (see there why: a busy machine made that 7x slower).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch
import torch.nn.functional as F

from mamba_training.model.scan.chunked import DEFAULT_CHUNK, ScanChunks

T = TypeVar("T")


class _Chunk:
    """Recomputable activations of one time chunk [s, e)."""

    def __init__(self, xz, s, e, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, d_inner, dt_rank, d_state):
        k = conv_w.shape[0]  # conv_w: (K, d_inner)
        lo = max(0, s - k + 1)
        window = xz[:, lo:e, :d_inner]
        if lo > s - k + 1:  # the first chunk: the conv sees zeros before time 0
            window = F.pad(window, (0, 0, lo - (s - k + 1), 0))
        self.s, self.e, self.lo, self.window = s, e, lo, window
        n = e - s
        pre = torch.addcmul(conv_b, window[:, k - 1 : k - 1 + n], conv_w[k - 1])
        for j in range(k - 1):
            pre.addcmul_(window[:, j : j + n], conv_w[j])
        self.pre = pre
        self.x = F.silu(pre)
        self.dbl = F.linear(self.x, x_proj_w)
        self.dt_low, self.B, self.C = self.dbl.split([dt_rank, d_state, d_state], dim=-1)
        self.dt_pre = torch.addmm(dt_bias, self.dt_low.flatten(0, 1), dt_proj_w.t()).view_as(self.x)
        self.dt = F.softplus(self.dt_pre)
        self.dtx = self.dt * self.x
        self.z = xz[:, s:e, d_inner:]


class _FusedMixer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w, chunk):  # type: ignore
        bsz, length, two_d = xz.shape
        w = _Weights(conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w)
        out = xz.new_empty(bsz, length, out_proj_w.shape[0])
        starts = xz.new_empty(-(-length // chunk), bsz, A.shape[1], w.d_inner)
        in_batch_parts(bsz, lambda rows: _forward_rows(xz[rows], w, chunk, out[rows], starts[:, rows]), xz.device)
        ctx.chunk = chunk
        ctx.save_for_backward(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w, starts)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w, starts = ctx.saved_tensors
        w = _Weights(conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w)
        g_xz = torch.empty_like(xz)
        parts = in_batch_parts(
            xz.shape[0],
            lambda rows: _backward_rows(xz[rows], grad_out[rows], starts[:, rows], w, ctx.chunk, g_xz[rows]),
            xz.device,
        )
        g_cw, g_cb, g_xproj, g_dtproj, g_dtbias, g_A, g_D, g_out = (sum(g) for g in zip(*parts))
        return g_xz, g_cw.t()[:, None, :].contiguous(), g_cb, g_xproj, g_dtproj, g_dtbias, g_A, g_D, g_out, None


class _Weights:
    def __init__(self, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w):
        self.cw = conv_w[:, 0, :].t()  # (K, d_inner)
        self.conv_b, self.x_proj_w, self.dt_proj_w, self.dt_bias = conv_b, x_proj_w, dt_proj_w, dt_bias
        self.A, self.D, self.out_proj_w = A, D, out_proj_w
        self.d_inner, self.dt_rank, self.d_state = A.shape[0], dt_proj_w.shape[1], A.shape[1]

    def chunk(self, xz, s, e) -> _Chunk:
        return _Chunk(xz, s, e, self.cw, self.conv_b, self.x_proj_w, self.dt_proj_w, self.dt_bias,
                      self.d_inner, self.dt_rank, self.d_state)


def _forward_rows(xz, w: _Weights, chunk, out, starts) -> None:
    """The forward for some batch rows: fills `out` and the chunk-start states `starts`."""
    engine = ScanChunks(w.A, xz.shape[0], xz.shape[1], chunk)
    h = engine.new_state()
    for c, (s, e) in enumerate(engine.bounds):
        starts[c] = h
        ch = w.chunk(xz, s, e)
        y, h = engine.forward_chunk(ch.dt, ch.dtx, ch.B, ch.C, h)
        y.addcmul_(ch.x, w.D).mul_(F.silu(ch.z))
        out[:, s:e] = F.linear(y, w.out_proj_w)


def _backward_rows(xz, grad_out, starts, w: _Weights, chunk, g_xz):
    """The backward for some batch rows: fills `g_xz`; returns their share of the weight gradients."""
    d_inner, k = w.d_inner, w.cw.shape[0]
    engine = ScanChunks(w.A, xz.shape[0], xz.shape[1], chunk)
    g_xz[..., :d_inner].zero_()  # the conv adds into it across chunk borders; the z half is assigned
    g_cw, g_cb = torch.zeros_like(w.cw), torch.zeros_like(w.conv_b)
    g_xproj, g_dtproj = torch.zeros_like(w.x_proj_w), torch.zeros_like(w.dt_proj_w)
    g_dtbias, g_D, g_out = torch.zeros_like(w.dt_bias), torch.zeros_like(w.D), torch.zeros_like(w.out_proj_w)
    for c in range(len(engine.bounds) - 1, -1, -1):
        s, e = engine.bounds[c]
        ch = w.chunk(xz, s, e)
        y, hb = engine.recompute(ch.dt, ch.dtx, ch.B, ch.C, starts[c])
        y.addcmul_(ch.x, w.D)
        go = grad_out[:, s:e]
        sz = torch.sigmoid(ch.z)
        silu_z = ch.z * sz
        g_out.addmm_(go.flatten(0, 1).t(), (y * silu_z).flatten(0, 1))
        g_gated = F.linear(go, w.out_proj_w.t())  # d loss / d (y * silu(z))
        g_xz[:, s:e, d_inner:] = g_gated * y * sz * (1 + ch.z * (1 - sz))
        gy = g_gated.mul_(silu_z)
        g_D += (gy * ch.x).sum((0, 1))
        g_x, g_dt, gB, gC = engine.backward_chunk(hb, ch.dt, ch.dtx, ch.x, ch.B, ch.C, gy)
        g_x.addcmul_(gy, w.D)
        g_dt_pre = g_dt.mul_(torch.sigmoid(ch.dt_pre)).flatten(0, 1)
        g_dtbias += g_dt_pre.sum(0)
        g_dtproj.addmm_(g_dt_pre.t(), ch.dt_low.flatten(0, 1))
        g_dbl = torch.cat([(g_dt_pre @ w.dt_proj_w).view_as(ch.dt_low), gB, gC], dim=-1)
        g_xproj.addmm_(g_dbl.flatten(0, 1).t(), ch.x.flatten(0, 1))
        g_x.add_(F.linear(g_dbl, w.x_proj_w.t()))
        g_pre = torch.ops.aten.silu_backward(g_x, ch.pre)
        g_cb += g_pre.sum((0, 1))
        _conv_backward(g_pre, ch, w.cw, g_cw, g_xz, k, d_inner)
    return g_cw, g_cb, g_xproj, g_dtproj, g_dtbias, engine.grad_A(), g_D, g_out


_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, size, pool)


def _worker_pool(size: int) -> ThreadPoolExecutor:
    """A process-wide pool; a forked child (DataLoader worker, ...) gets its own, as the
    parent's threads do not exist there."""
    global _pool
    if _pool is None or _pool[0] != os.getpid() or _pool[1] < size:
        _pool = (os.getpid(), size, ThreadPoolExecutor(max_workers=size, thread_name_prefix="mamba-mixer"))
    return _pool[2]


def in_batch_parts(bsz: int, work: Callable[[slice], T], device: torch.device) -> list[T]:
    """Run work(rows) for torch.get_num_threads() contiguous ranges of batch rows in parallel,
    each on one thread with single-threaded torch ops; results in row order.

    Why not torch's own intra-op threads: this mixer is thousands of small ops, and each
    multi-threaded op ends in a barrier. On a machine shared with other processes a barrier
    can wait a whole scheduler slice for a descheduled thread; measured on a busy 2-core VM,
    a step took 7x longer than with one thread. Splitting the batch across threads leaves one
    join per call, and batch rows are independent in everything but the weight gradients,
    which the caller sums in a fixed order (deterministic).
    """
    threads = torch.get_num_threads()
    parts = min(threads, bsz)
    if parts <= 1 or device.type != "cpu":
        return [work(slice(0, bsz))]
    grad_mode = torch.is_grad_enabled()  # thread-local: the pool's threads must match the caller

    def in_worker(rows: slice) -> T:
        with torch.set_grad_enabled(grad_mode):
            return work(rows)

    edges = [round(i * bsz / parts) for i in range(parts + 1)]
    ranges = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
    pool = _worker_pool(parts - 1)
    torch.set_num_threads(1)  # global: this thread's ops and the pool's run single-threaded
    try:
        futures = [pool.submit(in_worker, rows) for rows in ranges[1:]]
        first = work(ranges[0])
        return [first, *(f.result() for f in futures)]
    finally:
        torch.set_num_threads(threads)


def _conv_backward(g_pre, ch: _Chunk, cw, g_cw, g_xz, k, d_inner):
    """Weight gradient, and the input gradient added into g_xz (it reaches k-1 steps back)."""
    n = ch.e - ch.s
    offset = ch.lo - (ch.s - k + 1)  # rows of the window that are zero padding (first chunk only)
    for j in range(k):
        g_cw[j] += (g_pre * ch.window[:, j : j + n]).sum((0, 1))
        first = max(j, offset)  # window row j + i holds time s - k + 1 + j + i
        if first >= j + n:
            continue
        rows = slice(first - j, n)
        dst = slice(ch.s - k + 1 + first, ch.s - k + 1 + j + n)
        g_xz[:, dst, :d_inner].addcmul_(g_pre[:, rows], cw[j])


def fused_mixer(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w, chunk: int = DEFAULT_CHUNK):
    """The mixer from in_proj's output to out_proj's output. Half precision is computed in
    float32 and returned in xz's dtype; autocast is off inside."""
    dtype = xz.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    args = [t.to(work) for t in (xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D, out_proj_w)]
    with torch.autocast(xz.device.type, enabled=False):
        out = _FusedMixer.apply(*args, chunk)
    return out.to(dtype)
