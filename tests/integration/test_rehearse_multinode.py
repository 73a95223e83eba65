"""`mamba-training rehearse --nodes-per-job 2`: one job on two simulated instances, one spot notice.

Both instances' agents claim a node slot of the job and `launch` meets at the rehearsal's
coordinator; the notice (at the hold at step 11, once step 10 is committed) reaches one node: its
trainers commit, it leaves with 75, the job waits at 2:2 nodes for the replacement the group
launches, which claims the free slot and joins, and the run resumes from the emergency checkpoint.
The JSON must show the job done at its exact final step with no step lost, the interruption
counted, a replacement launched, the capacity back at zero, and no process left — torch's
elastic workers, which run in sessions of their own, included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.rehearsing import assert_nothing_left, rehearse

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("rehearse")]
SEED = 1  # its one notice is due at 28 % of the steps: the hold at step 11 of 20, after commit 10
STEPS = 20


@pytest.mark.timeout(1500)  # the Terraform apply against moto alone takes minutes on a busy machine
def test_a_two_node_job_survives_a_notice_with_a_replacement_node_and_loses_nothing(tmp_path: Path) -> None:
    print(f"seed {SEED}")
    directory = tmp_path / "rehearsal"
    done = rehearse("--instances", "2", "--jobs", "1", "--nodes-per-job", "2", "--interruptions", "1",
                    "--steps", str(STEPS), "--seed", str(SEED), "--dir", str(directory), "--json",
                    cwd=tmp_path, timeout=1400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert (result["seed"], result["nodes_per_job"]) == (SEED, 2)
    assert (result["jobs_completed"], result["jobs_failed"]) == (1, 0)
    assert result["interruptions"] == result["notices"] == 1 and result["hard_kills"] == 0
    [job] = result["jobs"]
    assert (job["state"], job["nodes"], job["final_step"], job["max_steps"]) == ("done", 2, STEPS, STEPS)
    assert job["lost_steps"] == job["lost_steps_after_notice"] == 0
    assert result["lost_steps"] == 0 and result["goodput"] == 1.0
    assert job["trained_steps"] == STEPS  # every step trained once, across the segments
    # The notice landed mid-job, at the hold: step 10 committed, then the emergency checkpoint of 11.
    assert [p[1] for p in job["progress"]][-1] == STEPS and {10, 11} <= {p[1] for p in job["progress"]}
    assert job["identical_to_straight"] is None and job["not_compared"].startswith("multi-node job")
    assert result["instances_launched"] >= 3  # the noticed node was replaced (its replacement joined the job)
    history = result["capacity_history"]
    assert history[0] == 0 and max(history) == 2 and history[-1] == 0
    assert_nothing_left(directory)


def test_a_submitted_config_whose_batch_does_not_split_over_the_nodes_is_refused_before_anything_starts(
        tmp_path: Path) -> None:
    config = tmp_path / "odd.yaml"
    config.write_text("model:\n  d_model: 32\n  n_layer: 2\ntrain:\n  batch_size: 4\n  seq_len: 32\n  max_steps: 10\n")
    result = rehearse("--instances", "3", "--nodes-per-job", "3", "--submit", str(config), cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "train.batch_size 4 must split evenly" in result.stderr and "3" in result.stderr
    assert not (tmp_path / "rehearsals").exists()
