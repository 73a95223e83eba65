"""The dtype flow under bf16 autocast, on the CPU: every scan backend receives x, delta, B, C, z
in one activation dtype and A, D, delta_bias in float32 (what mamba_ssm's kernel requires), and
a training step works end to end with float32 parameters and gradients. The Triton scan's
share of these checks runs under its interpreter in a child process (test_triton_scan.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mamba_training.model.mamba as mamba_module
from mamba_training.model import MambaConfig, MambaLM
from mamba_training.model.mamba import _causal_conv
from mamba_training.model.scan import SCANS

SEED = 3


def tiny_model(scan: str) -> MambaLM:
    print(f"seed {SEED}")
    torch.manual_seed(SEED)
    return MambaLM(MambaConfig(d_model=8, n_layer=2, vocab_size=29, d_state=4, scan=scan))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, 29, (2, 7), generator=torch.Generator().manual_seed(SEED))
    return tokens[:, :-1], tokens[:, 1:]


def bf16_step(model: MambaLM) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
    loss.backward()
    return logits, loss


def test_causal_conv_returns_the_input_dtype():
    x = torch.randn(2, 5, 3).bfloat16()
    out = _causal_conv(x, torch.randn(3, 1, 4), torch.randn(3), 5)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("scan", ["chunked", "reference"])  # triton: tests/model/triton_checks.py
def test_a_bf16_autocast_step_on_cpu_gives_float32_logits_and_gradients(scan):
    model = tiny_model(scan)
    logits, loss = bf16_step(model)
    assert logits.dtype == torch.float32 and torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_the_op_by_op_scan_receives_one_activation_dtype_and_float32_weights(monkeypatch: pytest.MonkeyPatch):
    scan = "reference"  # the same check for triton: tests/model/triton_checks.py
    seen = []
    real = SCANS[scan]

    def spy(x, delta, A, B, C, D, z, delta_bias):
        seen.append(tuple(t.dtype for t in (x, delta, B, C, z, A, D, delta_bias)))
        return real(x, delta, A, B, C, D, z, delta_bias)

    monkeypatch.setitem(SCANS, scan, spy)
    bf16_step(tiny_model(scan))
    bf16, f32 = torch.bfloat16, torch.float32
    assert seen == [(bf16,) * 5 + (f32,) * 3] * 2


def test_the_cuda_path_passes_the_strict_kernel_checks_under_autocast(monkeypatch: pytest.MonkeyPatch):
    """The mamba_ssm path, dtype by dtype, with a stand-in that refuses what the kernel refuses."""
    from model.strict_mamba_ssm import install

    calls = install(monkeypatch)
    monkeypatch.setattr(mamba_module, "resolve_scan_name", lambda name, device: "cuda")  # no GPU here
    model = tiny_model("cuda")
    logits, loss = bf16_step(model)
    assert len(calls) == 2 and all(c["dtypes"][:2] == (torch.bfloat16, torch.bfloat16) for c in calls)
    reference = tiny_model("reference")
    ref_logits, ref_loss = bf16_step(reference)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-3, msg=lambda m, name=name: f"{name}: {m}")
