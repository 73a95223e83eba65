"""Fixtures for the rehearsal tests: a fresh moto server from the rehearsal's own starter."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from mamba_training.fleet.rehearsal import moto
from mamba_training.fleet.rehearsal.procs import Processes


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path / "procs")
    try:
        yield procs
    finally:
        procs.stop_all()


@pytest.fixture
def rehearsal_aws(processes: Processes) -> Iterator[str]:
    """A moto server of the rehearsal's own (not the suite's), this process's boto3 pointed at it."""
    _, url = moto.start(processes)
    with moto.pointed_at(url):
        yield url
