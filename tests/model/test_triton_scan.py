"""The Triton scan equals the reference loop, values and every gradient, under Triton's
interpreter on the CPU, in a child process (tests/model/triton_checks.py says why)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.triton_checks import CHECKS

REPO = Path(__file__).resolve().parents[2]


def triton_path() -> Path:
    """Where a triton for the interpreter lives: MAMBA_TRITON_PATH, else .tools/triton (`make tools`)."""
    path = Path(os.environ.get("MAMBA_TRITON_PATH", REPO / ".tools" / "triton"))
    if not (path / "triton" / "__init__.py").is_file():
        raise AssertionError(f"no triton at {path} for the interpreter tests: run `make tools` "
                             "(or set MAMBA_TRITON_PATH to a `pip install --target` of triton)")
    return path


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), str(triton_path())])}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "model" / "triton_checks.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", list(CHECKS))
def test_triton_scan_under_the_interpreter(results: dict[str, str], check: str) -> None:
    assert results[check] == "ok", results[check]
