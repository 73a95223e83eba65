"""Store fixtures: a local directory, and an S3 prefix on the moto server (real HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mamba_training.aws.session import client
from mamba_training.checkpoint import Store, open_store

BUCKET = "ckpt-test"


def make_bucket(name: str = BUCKET) -> None:
    client("s3").create_bucket(Bucket=name)


@pytest.fixture
def s3_url(aws: str) -> str:
    make_bucket()
    return f"s3://{BUCKET}/runs/r1"


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_url")


@pytest.fixture
def store(store_url: str) -> Store:
    return open_store(store_url)
