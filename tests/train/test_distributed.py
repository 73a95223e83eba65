import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamba_training.train.distributed import DistInfo, all_reduce_max, all_reduce_mean, backends, peer_lost

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("timeout_worker.py")


def test_gpus_send_gradients_over_nccl_and_control_values_over_gloo() -> None:
    assert backends("cuda") == ("nccl", "gloo")
    assert backends("cpu") == ("gloo", None)


def test_a_single_process_reduces_to_its_own_value_without_a_group() -> None:
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert all_reduce_max(2.0, info) == 2.0 and all_reduce_mean(3.5, info) == 3.5


def test_the_collective_timeout_reaches_the_process_group_and_long_waits_outlast_it(tmp_path: Path) -> None:
    """Two real ranks (gloo on loopback, collective timeout 2 s): a barrier that one rank reaches
    5 s late still passes (it is on the long-wait group), and an all-reduce that the other rank
    never joins raises instead of waiting forever (bounded very generously: only a hang fails)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in ranks]
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in ranks] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    result = json.loads((tmp_path / "result.json").read_text())
    print(result)
    assert result["raised"] is True
    assert "Timed out" in result["message"]
    assert result["seconds"] < 120  # the timeout is 2 s; torch's default would be 30 min


@pytest.mark.parametrize(("message", "lost"), [
    ("[/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation to complete",
     "a peer stopped answering or went away (train.collective_timeout_s 10s): Timed out waiting 10000ms for recv "
     "operation to complete"),
    ("[/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5678",
     "a peer stopped answering or went away (train.collective_timeout_s 10s): Connection closed by peer "
     "[127.0.0.1]:5678"),
    ("CUDA out of memory", None),  # not a lost peer: the original error stands
    ("", None),
])
def test_a_lost_peer_becomes_one_line_naming_the_timeout(message: str, lost: str | None) -> None:
    found = peer_lost(RuntimeError(message), 10.0)
    assert (str(found) if found is not None else None) == lost
