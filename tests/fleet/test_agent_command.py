"""The command line an agent runs for a job: `train` on one node, `launch` on several."""

from __future__ import annotations

from pathlib import Path

import pytest

from mamba_training.errors import MambaTrainingError
from mamba_training.fleet.agent import training_command
from mamba_training.fleet.jobs import JobSpec


def spec(nodes: int) -> JobSpec:
    return JobSpec("job-1", "j", nodes, 0, 3, "s3://b/jobs/job-1/run", {})


def test_one_node_runs_train_on_the_jobs_own_store_and_the_agents_imds() -> None:
    command = training_command("py", Path("/w/job-1/config.yaml"), spec(1), "http://127.0.0.1:9", Path("/w/c"))
    assert command == ["py", "-m", "mamba_training", "train", "-c", "/w/job-1/config.yaml",
                       "--set", "checkpoint.store=s3://b/jobs/job-1/run", "--set", "checkpoint.cache_dir=/w/c",
                       "--set", "spot.imds_url=http://127.0.0.1:9", "--quiet"]


def test_several_nodes_run_launch_at_the_coordinator() -> None:
    command = training_command("py", Path("/w/c.yaml"), spec(3), "auto", Path("/w/c"), coordinator="10.0.0.5:29400",
                               nproc_per_node=4)
    assert command[:12] == ["py", "-m", "mamba_training", "launch", "--coordinator", "10.0.0.5:29400",
                            "--nnodes", "3:3", "--nproc-per-node", "4", "--run-id", "job-1"]
    assert command[12] == "--" and command[13:15] == ["-c", "/w/c.yaml"]


def test_one_node_with_several_gpus_runs_torchrun_standalone() -> None:
    command = training_command("py", Path("/w/c.yaml"), spec(1), "auto", Path("/w/c"), nproc_per_node=8)
    assert command[:7] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=8", "-m",
                           "mamba_training"]
    assert command[7] == "train"


def test_several_nodes_without_a_coordinator_is_an_error() -> None:
    with pytest.raises(MambaTrainingError, match="coordinator"):
        training_command("py", Path("c.yaml"), spec(2), "auto", Path("c"))
