"""The Triton scan equals the reference loop, values and every gradient, run by Triton's
interpreter on the CPU (tests/model/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

from mamba_training.model.scan import get_scan
from mamba_training.model.scan.reference import reference_scan
from mamba_training.model.scan.triton_scan import triton_scan

NAMES = ["x", "delta", "A", "B", "C", "D", "z", "delta_bias"]
SEED = 7


def make_inputs(b, length, d, n, dtype=torch.float32, seed=SEED):
    print(f"seed {seed}")
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {"x": randn(b, length, d), "delta": randn(b, length, d), "A": -torch.exp(randn(d, n)),
            "B": randn(b, length, n), "C": randn(b, length, n), "D": randn(d), "z": randn(b, length, d),
            "delta_bias": randn(d)}


@pytest.mark.parametrize(
    "b, length, d, n, chunk",
    [
        (1, 1, 3, 4, 4),  # one step
        (2, 10, 5, 3, 4),  # ragged last chunk, d_state not a power of two
        (1, 8, 20, 2, 4),  # L a multiple of the chunk, channels in two blocks
        (1, 5, 4, 16, 8),  # chunk longer than L
    ],
)
def test_triton_scan_equals_reference_values_and_gradients(b, length, d, n, chunk):
    exact = {k: v.double().requires_grad_() for k, v in make_inputs(b, length, d, n).items()}
    inputs = {k: v.detach().float().requires_grad_() for k, v in exact.items()}
    ref = reference_scan(**exact)
    out = triton_scan(**inputs, chunk=chunk)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(SEED + 1), dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, list(exact.values()), grad_out)
    grads = torch.autograd.grad(out, list(inputs.values()), grad_out.float())
    for name, r, g in zip(NAMES, ref_grads, grads):
        assert g.dtype == torch.float32 and g.shape == r.shape, name
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


def test_triton_scan_without_optional_inputs_equals_reference():
    inputs = make_inputs(1, 6, 3, 2)
    for key in ("D", "z", "delta_bias"):
        inputs[key] = None
    inputs = {k: (v.requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref = reference_scan(**inputs)
    out = triton_scan(**inputs, chunk=4)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    needed = [inputs[k] for k in ("x", "delta", "A", "B", "C")]
    for r, g in zip(torch.autograd.grad(ref.sum(), needed), torch.autograd.grad(out.sum(), needed)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_triton_scan_reads_strided_views_in_place_and_keeps_bfloat16():
    """The model hands over halves of in_proj's output and slices of x_proj's, in bf16 under autocast."""
    base = make_inputs(1, 6, 4, 3)
    xz = torch.cat([base["x"], base["z"]], dim=-1).bfloat16()
    dbl = torch.cat([base["B"], base["C"]], dim=-1).bfloat16()
    x, z = xz.chunk(2, dim=-1)
    B, C = dbl.split([3, 3], dim=-1)
    args = dict(x=x, delta=base["delta"].bfloat16(), A=base["A"], B=B, C=C, D=base["D"], z=z,
                delta_bias=base["delta_bias"])
    assert x.stride(-2) != x.shape[-1]  # really a strided view
    out = triton_scan(**args, chunk=4)
    assert out.dtype == torch.bfloat16
    exact = reference_scan(**{k: v.float() for k, v in args.items()})
    torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=2e-2)


def test_triton_is_reachable_by_name_on_cpu_under_the_interpreter():
    assert get_scan("triton", "cpu").__name__ == "triton_scan"
