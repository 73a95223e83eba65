"""GPU-only tests: run by bench/gpu.sh on a CUDA machine, never collected by CPU CI (this folder
is outside pytest's testpaths). Without a GPU they refuse to start rather than skip."""

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    if not torch.cuda.is_available():
        raise pytest.UsageError("tests_gpu/ needs a CUDA GPU: run bench/gpu.sh on one (CPU tests live in tests/)")
