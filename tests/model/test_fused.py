"""The fused CPU mixer (the default path) equals the op-by-op mixer with the reference scan."""

from __future__ import annotations

import pytest
import torch

from mamba_training.model import MambaConfig
from mamba_training.model.fused import fused_mixer
from mamba_training.model.mamba import MambaMixer


def float64_mixer(d_conv: int) -> MambaMixer:
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=8, n_layer=1, vocab_size=10, d_state=3, d_conv=d_conv, scan="reference")
    mixer = MambaMixer(cfg).double()
    with torch.no_grad():  # move off the structured init so every parameter matters
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return mixer


def run_fused(mixer: MambaMixer, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
    return fused_mixer(
        mixer.in_proj(hidden), mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight, mixer.dt_proj.weight,
        mixer.dt_proj.bias, -torch.exp(mixer.A_log), mixer.D, mixer.out_proj.weight, chunk=chunk,
    )


@pytest.mark.parametrize(
    "length, chunk, d_conv",
    [(1, 16, 4), (2, 16, 4), (5, 2, 4), (37, 8, 4), (19, 16, 3), (12, 1, 4)],  # L < d_conv, chunk < d_conv, ragged
)
def test_fused_mixer_equals_op_by_op_mixer_in_float64(length, chunk, d_conv):
    mixer = float64_mixer(d_conv)
    hidden = torch.randn(2, length, 8, dtype=torch.float64, requires_grad=True)
    reference = mixer(hidden)
    fused = run_fused(mixer, hidden, chunk)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(reference)
    inputs = [hidden, *mixer.parameters()]
    names = ["hidden", *(name for name, _ in mixer.named_parameters())]
    expected = torch.autograd.grad(reference, inputs, grad_out)
    got = torch.autograd.grad(fused, inputs, grad_out)
    for name, e, g in zip(names, expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")


def test_mixer_takes_the_fused_path_when_the_scan_is_chunked():
    mixer = float64_mixer(4)
    hidden = torch.randn(1, 9, 8, dtype=torch.float64)
    op_by_op = mixer(hidden)
    mixer.cfg = mixer.cfg.replace(scan="chunked")
    out = mixer(hidden)
    torch.testing.assert_close(out, op_by_op, rtol=1e-12, atol=1e-12)
    with torch.enable_grad():
        assert "FusedMixer" in type(mixer(hidden.requires_grad_()).grad_fn).__name__


def test_batch_split_across_threads_matches_one_thread_and_is_deterministic():
    mixer = float64_mixer(4)
    hidden = torch.randn(3, 21, 8, dtype=torch.float64, requires_grad=True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            out = run_fused(mixer, hidden, chunk=8)
            grads = torch.autograd.grad(out.square().sum(), [hidden, *mixer.parameters()])
            assert torch.get_num_threads() == threads  # restored after the split
            results.append((out, grads))
    finally:
        torch.set_num_threads(before)
    (out1, grads1), (out2, grads2), (out3, grads3) = results
    torch.testing.assert_close(out2, out1, rtol=1e-12, atol=1e-12)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-12)
    assert torch.equal(out2, out3) and all(torch.equal(a, b) for a, b in zip(grads2, grads3))
