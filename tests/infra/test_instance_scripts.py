"""The instance scripts run for real with stand-ins for the host: a loopback IMDSv2 server, and
stub systemctl / nvidia-smi / torchrun / mamba-training executables on PATH."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infra.terraform_env import STACK

FILES = STACK / "files"


class FakeImds:
    """IMDSv2 on 127.0.0.1: a token for PUT, then metadata only with that token."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self.metadata = metadata
        self.unauthorized = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                assert self.path == "/latest/api/token" and self.headers["X-aws-ec2-metadata-token-ttl-seconds"]
                self._send(200, "tok-123")

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != "tok-123":
                    owner.unauthorized += 1
                    return self._send(401, "")
                key = self.path.removeprefix("/latest/meta-data/")
                if key in owner.metadata:
                    return self._send(200, owner.metadata[key])
                self._send(404, "")

            def _send(self, code: int, body: str) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def imds():
    servers: list[FakeImds] = []

    def start(metadata: dict[str, str]) -> FakeImds:
        servers.append(FakeImds(metadata))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)


def host(tmp_path: Path, gpus: int, train_exit: int) -> tuple[Path, dict[str, str]]:
    """An app dir with a venv of stubs, and PATH stubs for the host tools."""
    app = tmp_path / "app"
    venv_bin = app / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    stub(venv_bin, "mamba-training", f'echo "mamba-training $*" >> "{calls}"\n'
         'if [ "$1" = checkpoints ]; then echo \'[{"step": 400, "committed": true}]\'; exit 0; fi\n'
         f"exit {train_exit}")
    stub(venv_bin, "torchrun", f'echo "torchrun $*" >> "{calls}"\nexit 1')
    gpu_lines = "\n".join(f"echo 'GPU {i}: Tesla T4 (UUID: GPU-{i})'" for i in range(gpus))
    stub(bin_dir, "nvidia-smi", f'if [ "$1" = --list-gpus ]; then\n{gpu_lines or ":"}\nelse echo "0, Tesla T4, 97 %"; fi')
    stub(bin_dir, "systemctl", 'echo "ActiveState=active"; echo "SubState=running"; echo "NRestarts=1"')
    logs = tmp_path / "logs"
    logs.mkdir()
    # Lines as the trainer writes them when its output is not a terminal (logging_setup.log_progress);
    # test_operator_cli.py checks the script against a real training's log.
    (logs / "training.log").write_text("12:00:00 INFO    step 120/1000  loss 2.2000  1,234 tok/s  ETA 5m12s\n"
                                       "12:00:05 INFO    event checkpoint: step 125 committed\n"
                                       "12:00:09 INFO    step 130/1000  loss 2.1000  1,240 tok/s  ETA 5m02s\n")
    (app / "env").write_text(f"MAMBA_RUN_STORE=s3://bucket/runs/dev\nMAMBA_LOG_DIR={logs}\n")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MAMBA_APP_DIR": str(app),
           "MAMBA_CONFIG": str(app / "config.yaml")}
    return calls, env


def run_script(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(FILES / name)], env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("code", [0, 1, 2, 75])
def test_one_gpu_is_a_one_process_node_and_its_exit_code_reaches_systemd(tmp_path: Path, code: int) -> None:
    calls, env = host(tmp_path, gpus=1, train_exit=code)
    env.update(MAMBA_COORDINATOR="10.0.0.5:29400", MAMBA_NNODES="1:1")
    result = run_script("start_training.sh", env)
    assert result.returncode == code
    assert calls.read_text().split("\n")[0] == (
        "mamba-training launch --coordinator 10.0.0.5:29400 --nnodes 1:1 --nproc-per-node 1 -- "
        f"--config {env['MAMBA_CONFIG']} --resume auto")


@pytest.mark.parametrize("gpus, nproc", [(0, 1), (4, 4)])
def test_a_node_runs_one_trainer_per_gpu_with_the_stacks_node_range(tmp_path: Path, gpus: int, nproc: int) -> None:
    calls, env = host(tmp_path, gpus=gpus, train_exit=0)
    env.update(MAMBA_COORDINATOR="10.0.0.5:29400", MAMBA_NNODES="2:4")
    assert run_script("start_training.sh", env).returncode == 0
    assert f"launch --coordinator 10.0.0.5:29400 --nnodes 2:4 --nproc-per-node {nproc} -- " in calls.read_text()


def test_without_a_coordinator_the_script_says_so_and_fails(tmp_path: Path) -> None:
    calls, env = host(tmp_path, gpus=1, train_exit=0)
    env.pop("MAMBA_COORDINATOR", None)
    result = run_script("start_training.sh", env)
    assert result.returncode != 0 and "MAMBA_COORDINATOR" in result.stderr
    assert not calls.exists()


def test_check_status_prints_service_gpus_step_checkpoint_and_spot_notice(tmp_path: Path, imds) -> None:
    calls, env = host(tmp_path, gpus=1, train_exit=0)
    notice = {"action": "terminate", "time": "2026-11-29T02:00:00Z"}
    env["MAMBA_IMDS_URL"] = imds({"spot/instance-action": json.dumps(notice),
                                  "autoscaling/target-lifecycle-state": "InService"}).url
    result = run_script("check_status.sh", env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ActiveState=active" in out and "Tesla T4" in out
    assert "== Current step ==\n130\n" in out
    assert '"step": 400' in out and "mamba-training checkpoints list s3://bucket/runs/dev --json" in calls.read_text()
    assert f"interruption: {json.dumps(notice)}" in out
    assert "rebalance recommendation: none" in out and "lifecycle state: InService" in out


def test_check_status_without_metadata_service_says_so(tmp_path: Path) -> None:
    _, env = host(tmp_path, gpus=0, train_exit=0)
    env["MAMBA_IMDS_URL"] = "http://127.0.0.1:9"  # discard port: nothing listens
    result = run_script("check_status.sh", env)
    assert "instance metadata service not reachable" in result.stdout
    assert "== Current step ==\n130" in result.stdout
