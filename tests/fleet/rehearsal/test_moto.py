"""The rehearsal's own moto server: fresh state every start, a port in use refused, the port freed at stop."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from mamba_training.aws.session import client
from mamba_training.errors import UsageError
from mamba_training.fleet.rehearsal import moto
from mamba_training.fleet.rehearsal.procs import Processes, port_free


def test_a_second_server_never_sees_the_first_ones_state(tmp_path: Path) -> None:
    processes = Processes(tmp_path / "procs")
    try:
        first, url = moto.start(processes)
        with moto.pointed_at(url):
            client("s3").create_bucket(Bucket="left-by-the-first")
            assert [b["Name"] for b in client("s3").list_buckets()["Buckets"]] == ["left-by-the-first"]
        first.stop()
        port = int(url.rsplit(":", 1)[1])
        assert port_free(port)
        _, second = moto.start(processes)
        with moto.pointed_at(second):
            assert client("s3").list_buckets()["Buckets"] == []
    finally:
        processes.stop_all()


def test_pointed_at_restores_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "someone")
    with moto.pointed_at("http://127.0.0.1:1"):
        import os

        assert os.environ["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1" and "AWS_PROFILE" not in os.environ
    assert os.environ["AWS_PROFILE"] == "someone"


def test_a_port_in_use_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"--moto-port {port}: port {port} on 127.0.0.1 is in use"):
            moto.start(Processes(tmp_path / "procs"), port)
