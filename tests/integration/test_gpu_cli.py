"""The GPU-related settings through the real CLI on a CPU: a scan backend that cannot run here
is refused before training with one line and exit 2; bf16 autocast trains on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from integration.test_train_cli import assert_one_error_line, final_weights, metrics, run_cli, train_args


@pytest.mark.parametrize(
    ("scan", "cause"),
    [
        ("cuda", "model.scan: 'cuda' needs a CUDA GPU and the mamba_ssm package, but tensors are on cpu; "
                 "use model.scan=auto"),
        ("triton", "model.scan: 'triton' needs a CUDA GPU and the triton package, but tensors are on cpu; "
                   "use model.scan=auto"),
    ],
)
def test_a_scan_that_cannot_run_on_this_device_is_one_line_and_exit_2(tmp_path: Path, scan, cause) -> None:
    proc = run_cli(train_args(tmp_path, "run", f"model.scan={scan}"), tmp_path, env={"TRITON_INTERPRET": "0"})
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, cause)
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the first step


def test_bf16_autocast_trains_on_the_cpu(tmp_path: Path) -> None:
    run_cli(train_args(tmp_path, "run", "train.amp=bf16", "train.max_steps=10"), tmp_path, check=True)
    losses = [m["loss"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert losses and all(loss == loss and loss < 10 for loss in losses)  # finite, no NaN
    weights = final_weights(tmp_path / "run")
    assert all(str(t.dtype) == "torch.float32" for t in weights.values())
