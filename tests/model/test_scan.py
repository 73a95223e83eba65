"""The fast selective scan equals the reference loop (values and every gradient); the registry."""

from __future__ import annotations

import pytest
import torch

from mamba_training.errors import ModelError
from mamba_training.model import available_scans, get_scan
from mamba_training.model.scan import resolve_scan_name
from mamba_training.model.scan.chunked import chunked_scan
from mamba_training.model.scan.reference import reference_scan

NAMES = ["x", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def make_inputs(b: int, length: int, d: int, n: int, dtype=torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    return {
        "x": randn(b, length, d),
        "delta": randn(b, length, d),
        "A": -torch.exp(randn(d, n)),  # negative, as the model's -exp(A_log)
        "B": randn(b, length, n),
        "C": randn(b, length, n),
        "D": randn(d),
        "z": randn(b, length, d),
        "delta_bias": randn(d),
    }


@pytest.mark.parametrize(
    "b, length, d, n, chunk",
    [
        (2, 1, 3, 4, 16),  # a single step
        (2, 7, 5, 3, 3),  # L not a multiple of the chunk
        (1, 37, 8, 4, 16),  # several chunks and a ragged tail
        (3, 32, 6, 5, 8),  # L an exact multiple of the chunk
        (2, 20, 4, 16, 64),  # chunk longer than L
    ],
)
def test_chunked_scan_equals_reference_values_and_gradients_in_float64(b, length, d, n, chunk):
    inputs = {k: v.requires_grad_() for k, v in make_inputs(b, length, d, n).items()}
    ref = reference_scan(**inputs)
    fast = chunked_scan(**inputs, chunk=chunk)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)

    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    ref_grads = torch.autograd.grad(ref, list(inputs.values()), grad_out)
    fast_grads = torch.autograd.grad(fast, list(inputs.values()), grad_out)
    for name, r, f in zip(NAMES, ref_grads, fast_grads):
        torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}")


def test_chunked_scan_without_optional_inputs_equals_reference():
    inputs = make_inputs(2, 19, 4, 3)
    for key in ("D", "z", "delta_bias"):
        inputs[key] = None
    inputs = {k: (v.requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref = reference_scan(**inputs)
    fast = chunked_scan(**inputs, chunk=8)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    needed = [inputs[k] for k in ("x", "delta", "A", "B", "C")]
    for r, f in zip(torch.autograd.grad(ref.sum(), needed), torch.autograd.grad(fast.sum(), needed)):
        torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-9)


def test_chunked_scan_passes_gradcheck():
    inputs = {k: v.requires_grad_() for k, v in make_inputs(1, 6, 2, 3).items()}
    assert torch.autograd.gradcheck(lambda *args: chunked_scan(*args, chunk=4), tuple(inputs.values()))


def test_large_steps_do_not_overflow_in_float32():
    inputs = make_inputs(2, 40, 4, 8, dtype=torch.float32)
    inputs["delta"] = inputs["delta"] * 30  # dt up to ~100: exp(dt * A) underflows to 0, never overflows
    out = chunked_scan(**inputs, chunk=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_scan(**inputs), rtol=1e-4, atol=1e-4)


def test_bfloat16_inputs_are_computed_in_float32_and_returned_in_bfloat16():
    inputs = make_inputs(2, 12, 4, 3, dtype=torch.float32)
    half = {k: v.to(torch.bfloat16) if k in ("x", "delta", "B", "C", "z") else v for k, v in inputs.items()}
    out = chunked_scan(**half)
    assert out.dtype == torch.bfloat16
    exact = reference_scan(**{k: v.float() for k, v in half.items()})
    torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=2e-2)


def test_registry_lists_every_backend():
    assert available_scans() == ["auto", "chunked", "reference", "cuda"]
    assert get_scan("chunked") is chunked_scan
    assert get_scan("reference") is reference_scan


def test_auto_means_chunked_on_cpu():
    assert resolve_scan_name("auto", torch.device("cpu")) == "chunked"


def test_unknown_scan_name_lists_the_valid_ones():
    with pytest.raises(ModelError) as err:
        get_scan("fastest")
    assert "'fastest'" in str(err.value)
    for name in available_scans():
        assert name in str(err.value)


def test_cuda_scan_on_cpu_tensors_is_a_clear_error():
    with pytest.raises(ModelError, match="'cuda' needs a GPU and the mamba_ssm package"):
        get_scan("cuda", "cpu")


def _selective_scan_ref_bdl(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm's selective_scan_ref, in its own (batch, channels, time) layout, variable B and C."""
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = A.new_zeros(u.shape[0], A.shape[0], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    out = torch.stack(ys, dim=2)
    out = out if D is None else out + u * D[..., None]
    return out if z is None else out * torch.nn.functional.silu(z)


def test_cuda_backend_hands_mamba_ssm_its_channel_first_layout(monkeypatch: pytest.MonkeyPatch):
    """No GPU here: a stand-in module with mamba_ssm's interface checks what cuda_scan passes it."""
    import sys
    import types

    from mamba_training.model.scan.cuda import cuda_scan

    calls = []

    def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kw):
        calls.append((u.shape, B.shape, delta_softplus))
        return _selective_scan_ref_bdl(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    for name in ("mamba_ssm", "mamba_ssm.ops"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    interface = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    interface.selective_scan_fn = selective_scan_fn
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", interface)

    inputs = make_inputs(2, 9, 5, 3)
    out = cuda_scan(**inputs)
    assert calls == [((2, 5, 9), (2, 3, 9), True)]
    torch.testing.assert_close(out, reference_scan(**inputs), rtol=1e-10, atol=1e-10)
