"""`mamba-training spot emulate` and `spot watch` as real subprocesses on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mamba_training", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def start_emulator(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "mamba_training", "spot", "emulate", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the first line names the URL
    assert line.startswith("IMDS emulator listening on http://127.0.0.1:"), line + proc.stderr.read()
    return proc, line.split()[4]


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    return proc.returncode, out


def request(method: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_emulate_serves_imdsv2_until_sigterm() -> None:
    port = free_port()
    proc, url = start_emulator("--port", str(port), "--instance-type", "g6.xlarge", "--lifecycle", "on-demand")
    try:
        assert url == f"http://127.0.0.1:{port}"
        assert request("GET", f"{url}/latest/meta-data/instance-type")[0] == 401  # no token
        status, token = request("PUT", f"{url}/latest/api/token", {TTL: "300"})
        assert status == 200
        assert request("GET", f"{url}/latest/meta-data/instance-type", {TOKEN: token}) == (200, "g6.xlarge")
        assert request("GET", f"{url}/latest/meta-data/instance-life-cycle", {TOKEN: token}) == (200, "on-demand")
        assert request("GET", f"{url}/latest/meta-data/spot/instance-action", {TOKEN: token})[0] == 404
        assert request("POST", f"{url}/control/interrupt?action=stop")[0] == 200
        status, body = request("GET", f"{url}/latest/meta-data/spot/instance-action", {TOKEN: token})
        assert status == 200 and json.loads(body)["action"] == "stop"
    finally:
        code, out = stop(proc)
    assert code == 0 and "IMDS emulator stopped" in out
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/control/state", timeout=1)


def test_emulate_schedules_a_notice_and_watch_reports_it() -> None:
    proc, url = start_emulator("--port", "0", "--interrupt-after", "0", "--action", "hibernate",
                               "--rebalance-after", "0", "--no-token-required")
    try:
        assert request("GET", f"{url}/latest/meta-data/instance-id")[0] == 200  # IMDSv1 allowed
        result = cli("spot", "watch", "--imds-url", url, "--once", "--json")
    finally:
        stop(proc)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["kind"] == "instance" and lines[0]["instance_id"] == "i-0123456789abcdef0"
    kinds = {line["kind"]: line for line in lines[1:]}
    assert kinds["interruption"]["action"] == "hibernate" and not kinds["interruption"]["malformed"]
    assert 100 < kinds["interruption"]["seconds_left"] <= 120
    assert "rebalance" in kinds


def test_emulate_refuses_a_bad_action_and_a_busy_port() -> None:
    bad = cli("spot", "emulate", "--port", "0", "--action", "reboot")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --action 'reboot': expected one of terminate, stop, hibernate"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = cli("spot", "emulate", "--port", str(sock.getsockname()[1]))
    assert busy.returncode == 2 and busy.stderr.startswith("error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in bad.stderr + busy.stderr


def test_watch_off_ec2_is_a_usage_error(tmp_path: Path) -> None:
    result = cli("spot", "watch", env={"MAMBA_TRAINING_DMI_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --imds-url auto: no instance metadata service (not on EC2)")


def test_watch_survives_an_unreachable_service() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = cli("spot", "watch", "--imds-url", url, "--poll-seconds", "0.1", "--duration", "0.5", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["instance_id"] is None
    assert result.stderr.count("unavailable") == 1  # logged once for the whole failure streak
    assert time.monotonic() - start < 20
