"""The Triton scan's checks, run by Triton's interpreter on the CPU in a child process.

tests/model/test_triton_scan.py starts this script with triton on the path (`make tools` puts a
copy in .tools/triton) and TRITON_INTERPRET=1. triton stays out of the test process and the
shared environment: once importable, `import torch` imports it, and a process that ends with an
error mid-run then prints nanobind leak reports after the error line. Prints one JSON object:
{check name: "ok" or the failure}, and exits 0.
"""

from __future__ import annotations

import json
import sys
import traceback

import torch
import torch.nn.functional as F

from mamba_training.model import MambaConfig, MambaLM
from mamba_training.model.scan import SCANS, get_scan
from mamba_training.model.scan.reference import reference_scan


def triton_scan(*args, **kwargs):
    # imported on use: the test process imports this module for the check names, without triton
    from mamba_training.model.scan.triton_scan import triton_scan as run

    return run(*args, **kwargs)

NAMES = ["x", "delta", "A", "B", "C", "D", "z", "delta_bias"]
SEED = 7
SHAPES = {  # (batch, L, d_inner, d_state, chunk)
    "one-step": (1, 1, 3, 4, 4),
    "ragged-chunk-odd-state": (2, 10, 5, 3, 4),
    "two-channel-blocks": (1, 8, 20, 2, 4),
    "chunk-longer-than-L": (1, 5, 4, 16, 8),
}


def make_inputs(b, length, d, n, dtype=torch.float32, seed=SEED):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {"x": randn(b, length, d), "delta": randn(b, length, d), "A": -torch.exp(randn(d, n)),
            "B": randn(b, length, n), "C": randn(b, length, n), "D": randn(d), "z": randn(b, length, d),
            "delta_bias": randn(d)}


def equals_reference(b, length, d, n, chunk) -> None:
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


def without_optional_inputs() -> None:
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


def strided_bfloat16_views() -> None:
    """The model hands over halves of in_proj's output and slices of x_proj's, bf16 under autocast."""
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


def reachable_by_name() -> None:
    assert get_scan("triton", "cpu") is SCANS["triton"]


def model_bf16_step_receives_one_activation_dtype() -> None:
    """A bf16 autocast training step of the model with scan=triton: the scan receives x, delta,
    B, C, z in bf16 and A, D, bias in float32; logits and every gradient are float32."""
    import mamba_training.model.scan.triton_scan as module

    module.CHUNK = 4  # the interpreter runs every step of a chunk, padded ones too
    seen = []

    def spy(x, delta, A, B, C, D, z, delta_bias):
        seen.append(tuple(t.dtype for t in (x, delta, B, C, z, A, D, delta_bias)))
        return triton_scan(x, delta, A, B, C, D, z, delta_bias)

    SCANS["triton"] = spy
    torch.manual_seed(SEED)
    model = MambaLM(MambaConfig(d_model=8, n_layer=2, vocab_size=29, d_state=4, scan="triton"))
    tokens = torch.randint(0, 29, (2, 7), generator=torch.Generator().manual_seed(SEED))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    loss.backward()
    assert seen == [(torch.bfloat16,) * 5 + (torch.float32,) * 3] * 2, seen
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


CHECKS = {
    **{f"equals-reference[{name}]": (lambda shape=shape: equals_reference(*shape)) for name, shape in SHAPES.items()},
    "without-optional-inputs": without_optional_inputs,
    "strided-bfloat16-views": strided_bfloat16_views,
    "reachable-by-name": reachable_by_name,
    "model-bf16-step": model_bf16_step_receives_one_activation_dtype,  # last: it replaces SCANS["triton"]
}


def main() -> None:
    print(f"seed {SEED}", file=sys.stderr)
    results = {}
    for name, check in CHECKS.items():
        try:
            check()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc(limit=4)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
