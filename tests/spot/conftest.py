"""Spot test fixtures: an in-process IMDS emulator on loopback, a log recorder, a network guard."""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import Callable, Iterator

import pytest

from mamba_training.spot.emulator import ImdsEmulator


def _is_loopback(address: object) -> bool:
    if isinstance(address, tuple) and address:
        host = address[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False
    return isinstance(address, (str, bytes))  # unix sockets


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every spot test fails if anything tries to connect beyond loopback (the EC2 metadata address above all).

    Yields the list of refused addresses, so a test can also assert nothing was attempted.
    """
    refused: list[object] = []
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guard(address: object) -> None:
        if not _is_loopback(address):
            refused.append(address)
            raise AssertionError(f"spot test tried to connect to {address!r}")

    def connect(self: socket.socket, address: object) -> None:
        guard(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        guard(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    return refused


@pytest.fixture
def emulator() -> Iterator[ImdsEmulator]:
    emu = ImdsEmulator(port=0).start()
    try:
        yield emu
    finally:
        emu.stop()


class LogRecorder(logging.Handler):
    """Collects records of one logger, whatever propagation the package logging setup chose."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def spot_logs() -> Iterator[LogRecorder]:
    logger = logging.getLogger("mamba_training.spot")
    recorder = LogRecorder()
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(recorder)
    try:
        yield recorder
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(old_level)


def _wait_for(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.01) -> object:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture
def wait_for() -> Callable[..., object]:
    return _wait_for
