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
    assert available_scans() == ["auto", "chunked", "reference", "triton", "cuda"]
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
    with pytest.raises(ModelError, match="'cuda' needs a CUDA GPU and the mamba_ssm package, but tensors are on cpu; "
                                         "use model.scan=auto"):
        get_scan("cuda", "cpu")


def test_triton_scan_on_cpu_tensors_is_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ModelError, match="'triton' needs a CUDA GPU and the triton package, but tensors are on cpu; "
                                         "use model.scan=auto"):
        get_scan("triton", "cpu")


def test_cuda_backend_passes_the_strict_kernel_checks_and_equals_reference(monkeypatch: pytest.MonkeyPatch):
    from mamba_training.model.scan.cuda import cuda_scan
    from model.strict_mamba_ssm import install

    calls = install(monkeypatch)
    inputs = {k: v.requires_grad_() for k, v in make_inputs(2, 9, 5, 3, dtype=torch.float32).items()}
    out = cuda_scan(**inputs)
    assert calls[0]["u"] == (2, 5, 9) and calls[0]["B"] == (2, 1, 3, 9) and calls[0]["softplus"]
    ref = reference_scan(**inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    for name, r, f in zip(NAMES, torch.autograd.grad(ref, list(inputs.values()), grad_out),
                          torch.autograd.grad(out, list(inputs.values()), grad_out)):
        torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


def test_cuda_backend_in_bfloat16_returns_bfloat16_and_float32_weight_gradients(monkeypatch: pytest.MonkeyPatch):
    from mamba_training.model.scan.cuda import cuda_scan
    from model.strict_mamba_ssm import install

    install(monkeypatch)
    inputs = make_inputs(2, 6, 4, 3, dtype=torch.float32)
    half = {k: (v.bfloat16() if k in ("x", "delta", "B", "C", "z") else v).requires_grad_() for k, v in inputs.items()}
    out = cuda_scan(**half)
    assert out.dtype == torch.bfloat16
    grads = dict(zip(NAMES, torch.autograd.grad(out.float().sum(), list(half.values()))))
    assert {k: g.dtype for k, g in grads.items()} == {k: v.dtype for k, v in half.items()}


@pytest.mark.parametrize(
    "change, complaint",
    [
        ({"x": torch.float32, "delta": torch.bfloat16}, "delta.dtype == u.dtype"),  # the old autocast bug
        ({"x": torch.float64, "delta": torch.float64, "B": torch.float64, "C": torch.float64, "z": torch.float64},
         "u float32/float16/bfloat16"),
        ({"A": torch.float64}, "A float32"),
        ({"D": torch.bfloat16}, "D float32"),
        ({"delta_bias": torch.float16}, "delta_bias float32"),
        ({"z": torch.bfloat16}, "z.dtype == u.dtype"),
        ({"B": torch.bfloat16}, "B.dtype == u.dtype"),
    ],
)
def test_strict_kernel_stand_in_rejects_what_mamba_ssm_rejects(monkeypatch: pytest.MonkeyPatch, change, complaint):
    from mamba_training.model.scan.cuda import cuda_scan
    from model.strict_mamba_ssm import KernelCheckError, install

    install(monkeypatch)
    inputs = make_inputs(1, 4, 3, 2, dtype=torch.float32)
    inputs.update({k: inputs[k].to(dtype) for k, dtype in change.items()})
    with pytest.raises(KernelCheckError, match=complaint.replace("(", r"\(").replace(")", r"\)")):
        cuda_scan(**inputs)


def test_strict_kernel_stand_in_rejects_tensors_on_another_device(monkeypatch: pytest.MonkeyPatch):
    from mamba_training.model.scan.cuda import cuda_scan
    from model.strict_mamba_ssm import KernelCheckError, install

    install(monkeypatch, device_type="meta")  # CPU tensors, as CPU tensors are for the real kernel
    with pytest.raises(KernelCheckError, match="u on u's meta device, got cpu"):
        cuda_scan(**make_inputs(1, 4, 3, 2, dtype=torch.float32))
