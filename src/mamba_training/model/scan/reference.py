"""The reference selective scan: a plain loop over time, the specification the fast ones match.

Shapes (batch-first, time-second, as the model produces them without transposes):
x, delta, z: (batch, L, d_inner); A: (d_inner, d_state); B, C: (batch, L, d_state);
D, delta_bias: (d_inner,). Returns (batch, L, d_inner):

    dt_t = softplus(delta_t + delta_bias)
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t        (h_0 = 0, per channel and state)
    y_t  = (C_t . h_t + D * x_t) * silu(z_t)

Autograd differentiates it step by step: slow, but obviously right. Half-precision inputs are
computed in float32 and the result returned in x's dtype, as mamba_ssm's `selective_scan_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_scan(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x, delta, A, B, C = x.float(), delta.float(), A.float(), B.float(), C.float()
        z = z.float() if z is not None else None
    dt = F.softplus(delta if delta_bias is None else delta + delta_bias)
    h = x.new_zeros(x.shape[0], x.shape[2], A.shape[1])
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * F.silu(z)
    return y.to(dtype)
