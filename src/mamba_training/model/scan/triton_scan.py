"""The Triton selective scan: the default on CUDA when mamba_ssm is not installed.

Triton ships with torch's CUDA wheels, so this path needs nothing compiled on the instance
(mamba_ssm has no wheels: installing it means building CUDA code on every new machine).

One program owns one batch row and a block of BLOCK_D channels, keeps their (BLOCK_D, d_state)
state in registers and walks time step by step, so each step reads one contiguous vector of x,
delta, z (batch, time, channel layout: the model's, no transposes) and one of B and C; strided
inputs (the halves of in_proj's output, the slices of x_proj's) are read in place. Arithmetic is
float32 whatever the input dtype; outputs and input gradients come back in the inputs' dtypes,
the float32 weights' gradients in float32, as mamba_ssm's kernel does.

    forward   dt_t = softplus(delta_t + bias),  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t,
              y_t  = (C_t . h_t + D x_t) * silu(z_t)
    backward  the recurrence reversed (see chunked.py for the algebra), chunk by chunk

The forward stores the state at the start of every CHUNK steps; the backward visits the chunks
last to first, recomputes the chunk's states from its start into a per-program scratch buffer
(small enough to stay in L2), then walks them backwards. Cross-channel sums (dB, dC) are written
per channel block and summed afterwards, and dA, dD, d bias per batch row: no atomics, so the
gradients are deterministic.

Tested on CPU with Triton's interpreter (TRITON_INTERPRET=1) against the reference scan.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

CHUNK = 32  # time steps between saved states: memory (L / CHUNK states) against recompute scratch
LOG2E = 1.0 / math.log(2.0)


@triton.jit
def _softplus(v):
    # torch's softplus with its default threshold 20 (above it, the identity)
    return tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))


@triton.jit
def _scan_fwd(
    x_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
    L, DIM, NSTATE, n_chunks,
    s_xb, s_xl, s_db, s_dl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_ob, s_ol,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # every offset below in 64 bits: large batch x L x d_inner
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dm, nm = d < DIM, n < NSTATE
    dn_mask = dm[:, None] & nm[None, :]
    A2 = tl.load(A_ptr + d[:, None] * NSTATE + n[None, :], mask=dn_mask, other=0.0).to(tl.float32) * 1.4426950408889634
    Dv = tl.zeros([BLOCK_D], tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dm, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32)
    h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    st = states_ptr + ((b * n_chunks) * DIM + d[:, None]) * NSTATE + n[None, :]
    for c in range(n_chunks):
        tl.store(st + c * DIM * NSTATE, h, mask=dn_mask)
        for i in range(CHUNK):
            t = c * CHUNK + i
            dok = dm & (d * 0 + t < L)
            nok = nm & (n * 0 + t < L)
            x = tl.load(x_ptr + b * s_xb + t * s_xl + d, mask=dok, other=0.0).to(tl.float32)
            dl = tl.load(delta_ptr + b * s_db + t * s_dl + d, mask=dok, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + b * s_bb + t * s_bl + n, mask=nok, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + b * s_cb + t * s_cl + n, mask=nok, other=0.0).to(tl.float32)
            dt = _softplus(dl + bias)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * x)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1) + Dv * x
            if HAS_Z:
                z = tl.load(z_ptr + b * s_zb + t * s_zl + d, mask=dok, other=0.0).to(tl.float32)
                y = y * z * tl.sigmoid(z)
            tl.store(out_ptr + b * s_ob + t * s_ol + d, y.to(out_ptr.dtype.element_ty), mask=dok)


@triton.jit
def _scan_bwd(
    x_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, gout_ptr, scratch_ptr,
    gx_ptr, gdelta_ptr, gz_ptr, gB_ptr, gC_ptr, gA_ptr, gD_ptr, gbias_ptr,
    L, DIM, NSTATE, n_chunks, n_dblocks,
    s_xb, s_xl, s_db, s_dl, s_bb, s_bl, s_cb, s_cl, s_zb, s_zl, s_gb, s_gl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # every offset below in 64 bits: large batch x L x d_inner
    pd = tl.program_id(1)
    d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    dm, nm = d < DIM, n < NSTATE
    dn_mask = dm[:, None] & nm[None, :]
    A = tl.load(A_ptr + d[:, None] * NSTATE + n[None, :], mask=dn_mask, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    Dv = tl.zeros([BLOCK_D], tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dm, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dm, other=0.0).to(tl.float32)
    tile = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + n[None, :]
    scratch = scratch_ptr + (b * n_dblocks + pd) * (CHUNK + 1) * BLOCK_D * BLOCK_N + tile
    st = states_ptr + ((b * n_chunks) * DIM + d[:, None]) * NSTATE + n[None, :]
    part = (b * n_dblocks + pd) * L * NSTATE  # this program's rows of the per-block dB, dC partials
    carry = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)  # a_{t+1} * g_{t+1}
    gA = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
    gD = tl.zeros([BLOCK_D], tl.float32)
    gbias = tl.zeros([BLOCK_D], tl.float32)
    for cc in range(n_chunks):
        c = n_chunks - 1 - cc
        h = tl.load(st + c * DIM * NSTATE, mask=dn_mask, other=0.0)
        tl.store(scratch, h)
        for i in range(CHUNK):  # recompute the chunk's states: scratch[i + 1] = h after step i
            t = c * CHUNK + i
            dok = dm & (d * 0 + t < L)
            nok = nm & (n * 0 + t < L)
            x = tl.load(x_ptr + b * s_xb + t * s_xl + d, mask=dok, other=0.0).to(tl.float32)
            dl = tl.load(delta_ptr + b * s_db + t * s_dl + d, mask=dok, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + b * s_bb + t * s_bl + n, mask=nok, other=0.0).to(tl.float32)
            dt = _softplus(dl + bias)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * x)[:, None] * Bt[None, :]
            tl.store(scratch + (i + 1) * BLOCK_D * BLOCK_N, h)
        tl.debug_barrier()
        for ii in range(CHUNK):
            i = CHUNK - 1 - ii
            t = c * CHUNK + i
            dok = dm & (d * 0 + t < L)
            nok = nm & (n * 0 + t < L)
            x = tl.load(x_ptr + b * s_xb + t * s_xl + d, mask=dok, other=0.0).to(tl.float32)
            dl = tl.load(delta_ptr + b * s_db + t * s_dl + d, mask=dok, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + b * s_bb + t * s_bl + n, mask=nok, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + b * s_cb + t * s_cl + n, mask=nok, other=0.0).to(tl.float32)
            gy = tl.load(gout_ptr + b * s_gb + t * s_gl + d, mask=dok, other=0.0).to(tl.float32)
            h_prev = tl.load(scratch + i * BLOCK_D * BLOCK_N)
            h_t = tl.load(scratch + (i + 1) * BLOCK_D * BLOCK_N)
            v = dl + bias
            dt = _softplus(v)
            a = tl.exp2(dt[:, None] * A2)
            if HAS_Z:
                z = tl.load(z_ptr + b * s_zb + t * s_zl + d, mask=dok, other=0.0).to(tl.float32)
                sz = tl.sigmoid(z)
                y = tl.sum(h_t * Ct[None, :], axis=1) + Dv * x
                gz = gy * y * sz * (1.0 + z * (1.0 - sz))
                tl.store(gz_ptr + (b * L + t) * DIM + d, gz, mask=dok)
                gy = gy * z * sz
            g = gy[:, None] * Ct[None, :] + carry
            gC_t = tl.sum(gy[:, None] * h_t, axis=0)
            gB_t = tl.sum(g * (dt * x)[:, None], axis=0)
            tl.store(gC_ptr + part + t * NSTATE + n, gC_t, mask=nok)
            tl.store(gB_ptr + part + t * NSTATE + n, gB_t, mask=nok)
            q = tl.sum(g * Bt[None, :], axis=1)
            w = g * a * h_prev
            gA += w * dt[:, None]
            g_dt = tl.sum(w * A, axis=1) + x * q
            gx = dt * q + Dv * gy
            gD += gy * x
            g_v = g_dt * tl.where(v > 20.0, 1.0, tl.sigmoid(v))
            gbias += g_v
            tl.store(gx_ptr + (b * L + t) * DIM + d, gx, mask=dok)
            tl.store(gdelta_ptr + (b * L + t) * DIM + d, g_v, mask=dok)
            carry = a * g
        tl.debug_barrier()
    tl.store(gA_ptr + (b * DIM + d[:, None]) * NSTATE + n[None, :], gA, mask=dn_mask)
    tl.store(gD_ptr + b * DIM + d, gD, mask=dm)
    tl.store(gbias_ptr + b * DIM + d, gbias, mask=dm)


def _blocks(batch: int, dim: int, d_state: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_N). Smaller channel blocks mean more programs: the time loop is
    latency-bound, so more programs in flight hide more of each step's load latency."""
    block_n = triton.next_power_of_2(d_state)
    block_d = 32 if batch * triton.cdiv(dim, 32) >= 1024 else 16
    return max(1, min(block_d, 4096 // block_n)), block_n


def _last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, z, delta_bias, chunk):  # type: ignore[override]
        x, delta, B, C = (_last_stride(t) for t in (x, delta, B, C))
        z = _last_stride(z) if z is not None else None
        A = A.float().contiguous()
        D = D.float().contiguous() if D is not None else None
        delta_bias = delta_bias.float().contiguous() if delta_bias is not None else None
        batch, length, dim = x.shape
        d_state = A.shape[1]
        block_d, block_n = _blocks(batch, dim, d_state)
        n_chunks = triton.cdiv(length, chunk)
        out = torch.empty(batch, length, dim, dtype=x.dtype, device=x.device)
        states = torch.empty(batch, n_chunks, dim, d_state, dtype=torch.float32, device=x.device)
        zz = z if z is not None else x
        grid = (batch, triton.cdiv(dim, block_d))
        _scan_fwd[grid](
            x, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A, out, states,
            length, dim, d_state, n_chunks,
            x.stride(0), x.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1),
            C.stride(0), C.stride(1), zz.stride(0), zz.stride(1), out.stride(0), out.stride(1),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk,
        )
        ctx.save_for_backward(x, delta, A, B, C, D, z, delta_bias, states)
        ctx.blocks, ctx.chunk = (block_d, block_n), chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        (block_d, block_n), chunk = ctx.blocks, ctx.chunk
        grad_out = _last_stride(grad_out)
        batch, length, dim = x.shape
        d_state = A.shape[1]
        n_chunks = states.shape[1]
        n_dblocks = triton.cdiv(dim, block_d)
        f32 = dict(dtype=torch.float32, device=x.device)
        scratch = torch.empty(batch, n_dblocks, chunk + 1, block_d, block_n, **f32)
        gx = torch.empty(batch, length, dim, **f32)
        gdelta = torch.empty(batch, length, dim, **f32)
        gz = torch.empty(batch, length, dim, **f32) if z is not None else gx
        gB = torch.empty(batch, n_dblocks, length, d_state, **f32)
        gC = torch.empty(batch, n_dblocks, length, d_state, **f32)
        gA = torch.empty(batch, dim, d_state, **f32)
        gD = torch.empty(batch, dim, **f32)
        gbias = torch.empty(batch, dim, **f32)
        zz = z if z is not None else x
        _scan_bwd[(batch, n_dblocks)](
            x, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A,
            states, grad_out, scratch,
            gx, gdelta, gz, gB, gC, gA, gD, gbias,
            length, dim, d_state, n_chunks, n_dblocks,
            x.stride(0), x.stride(1), delta.stride(0), delta.stride(1), B.stride(0), B.stride(1),
            C.stride(0), C.stride(1), zz.stride(0), zz.stride(1), grad_out.stride(0), grad_out.stride(1),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=chunk,
        )
        return (
            gx.to(x.dtype), gdelta.to(delta.dtype), gA.sum(0), gB.sum(1).to(B.dtype), gC.sum(1).to(C.dtype),
            gD.sum(0) if D is not None else None, gz.to(z.dtype) if z is not None else None,
            gbias.sum(0) if delta_bias is not None else None, None,
        )


def triton_scan(x, delta, A, B, C, D=None, z=None, delta_bias=None, chunk: int | None = None):
    """The scan of `reference.py` as two Triton kernels; output in x's dtype. Autocast is off
    inside (the kernels choose their own precision). `chunk`: steps between saved states."""
    with torch.autocast(x.device.type, enabled=False):
        return _TritonScan.apply(x, delta, A, B, C, D, z, delta_bias, chunk or CHUNK)
