"""The GPU path on a real GPU: the Triton scan against the reference, the model under bf16
autocast, fused AdamW, the side-stream snapshot, and a short training run through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mamba_training.model import MambaConfig, MambaLM
from mamba_training.model.scan import resolve_scan_name, triton_importable
from mamba_training.model.scan.cuda import cuda_scan_available
from mamba_training.model.scan.reference import reference_scan

CUDA = torch.device("cuda")
REPO = Path(__file__).resolve().parents[1]
SEED = 11
NAMES = ["x", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def make_inputs(b, length, d, n, dtype=torch.float32):
    print(f"seed {SEED}")
    gen = torch.Generator().manual_seed(SEED)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(CUDA)

    return {"x": randn(b, length, d), "delta": randn(b, length, d), "A": -torch.exp(randn(d, n)),
            "B": randn(b, length, n), "C": randn(b, length, n), "D": randn(d), "z": randn(b, length, d),
            "delta_bias": randn(d)}


def test_auto_picks_mamba_ssm_when_installed_else_triton():
    assert triton_importable()
    assert resolve_scan_name("auto", CUDA) == ("cuda" if cuda_scan_available() else "triton")


@pytest.mark.parametrize("b, length, d, n", [(2, 300, 96, 16), (1, 77, 40, 5)])
def test_triton_scan_equals_reference_on_the_gpu(b, length, d, n):
    from mamba_training.model.scan.triton_scan import triton_scan

    exact = {k: v.double().requires_grad_() for k, v in make_inputs(b, length, d, n).items()}
    inputs = {k: v.detach().float().requires_grad_() for k, v in exact.items()}
    ref = reference_scan(**exact)
    out = triton_scan(**inputs)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    grad_out = torch.randn_like(ref)
    for name, r, g in zip(NAMES, torch.autograd.grad(ref, list(exact.values()), grad_out),
                          torch.autograd.grad(out, list(inputs.values()), grad_out.float())):
        torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-3, msg=lambda m, name=name: f"grad {name}: {m}")


def tiny(scan: str) -> MambaLM:
    torch.manual_seed(SEED)
    return MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=101, scan=scan)).to(CUDA)


def bf16_loss(model: MambaLM) -> torch.Tensor:
    tokens = torch.randint(0, 101, (2, 129), generator=torch.Generator().manual_seed(SEED)).to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
    loss.backward()
    return loss


def test_model_under_bf16_autocast_matches_the_reference_scan_with_every_backend():
    ref_model = tiny("reference")
    ref_loss = bf16_loss(ref_model)
    for scan in ["triton", *(["cuda"] if cuda_scan_available() else [])]:
        model = tiny(scan)
        loss = bf16_loss(model)
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert p.grad.dtype == torch.float32, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-1, atol=1e-2, msg=lambda m, name=name: f"{scan} {name}: {m}")


def test_adamw_is_fused_for_a_gpu_model():
    from mamba_training.config import build_config
    from mamba_training.train.optim import build_optimizer

    optimizer = build_optimizer(tiny("auto"), build_config({}, []).train)
    assert all(group["fused"] for group in optimizer.param_groups)


def test_snapshot_copies_the_state_at_capture_on_a_side_stream_into_pinned_memory():
    from safetensors.torch import load

    from mamba_training.checkpoint.state import snapshot

    model = tiny("auto")
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    bf16_loss(model)
    optimizer.step()
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    snap = snapshot({"model": model, "optimizer": optimizer}, defer_large=True)
    assert snap.ready is not None
    bf16_loss(model)  # more work queued on the compute stream while the copy runs
    data = snap.serialize()
    assert data.is_pinned()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # after serialize: the bytes must not change
    saved = {k[len("model/"):]: v for k, v in load(bytes(data.numpy())).items() if k.startswith("model/")}
    assert saved and set(saved) <= set(expected)  # a tied weight may be saved once
    for name, value in saved.items():
        assert torch.equal(value, expected[name]), name


def test_a_short_bf16_training_run_through_the_cli(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "mamba_training", "train", "--config", str(REPO / "configs" / "tiny.yaml"),
         "--set", f"checkpoint.store={tmp_path / 'run'}", "--set", "train.max_steps=30", "--set", "train.amp=bf16",
         "--set", "train.device=cuda", "--set", "spot.imds_url=off", "--set", "logging.cloudwatch=off",
         "--set", "checkpoint.every_steps=10", "--set", "train.sample_tokens=0"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "run" / "final").is_dir()
