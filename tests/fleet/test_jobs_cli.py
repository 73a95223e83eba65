"""submit / jobs list|show|cancel|logs / reconcile --once against the moto server over HTTP, and the
jobs store's conditional writes (leases), including two claimants racing for one job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mamba_training.aws.session import client
from mamba_training.fleet.jobs import JobsStore
from tests.aws.moto_fleet import ASG, assert_one_line_error, cli, group, make_fleet

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "tiny.yaml")
BUCKET = "jobs-cli"


@pytest.fixture
def endpoints(aws: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    client("s3").create_bucket(Bucket=BUCKET)
    queue = client("sqs").create_queue(QueueName="jobs")["QueueUrl"]
    store = f"s3://{BUCKET}/jobs"
    monkeypatch.setenv("MAMBA_QUEUE_URL", queue)
    monkeypatch.setenv("MAMBA_JOBS_STORE", store)
    return queue, store


def queued_messages(queue: str) -> int:
    attrs = client("sqs").get_queue_attributes(QueueUrl=queue, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attrs["Attributes"]["ApproximateNumberOfMessages"])


def submit(capsys, *args: str) -> dict:
    code, out, err = cli(capsys, "submit", CONFIG, "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_submit_writes_spec_and_state_and_enqueues(endpoints, capsys):
    queue, store = endpoints
    job = submit(capsys, "--set", "train.max_steps=7", "--nodes", "2", "--name", "small", "--priority", "3",
                 "--max-attempts", "4")
    assert job["state"] == "queued" and job["nodes"] == 2 and job["priority"] == 3 and job["max_attempts"] == 4
    assert queued_messages(queue) == 1
    code, out, err = cli(capsys, "jobs", "list", "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [(j["id"], j["name"], j["state"], j["attempts"], j["step"]) for j in listed] == [
        (job["id"], "small", "queued", 0, None)]
    code, out, _ = cli(capsys, "jobs", "show", job["id"], "--json")
    shown = json.loads(out)
    assert shown["config"]["train"]["max_steps"] == 7
    assert shown["run_store"] == f"{store}/{job['id']}/run"  # each job has a run of its own


def test_a_config_naming_an_s3_store_keeps_it(endpoints, capsys):
    job = submit(capsys, "--set", f"checkpoint.store=s3://{BUCKET}/elsewhere/run1")
    code, out, _ = cli(capsys, "jobs", "show", job["id"], "--json")
    assert json.loads(out)["run_store"] == f"s3://{BUCKET}/elsewhere/run1"


def test_plain_text_list_and_submit_print_the_id(endpoints, capsys):
    code, out, _ = cli(capsys, "submit", CONFIG)
    job_id = out.strip()
    assert code == 0 and job_id.startswith("job-")
    code, out, _ = cli(capsys, "jobs", "list")
    assert code == 0 and [line for line in out.splitlines() if job_id in line and "queued" in line]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "train.max_steps=-1"], "train.max_steps"),
        (["--set", "train.nope=1"], "unknown config key train.nope"),
        (["--nodes", "0"], "--nodes 0"),
        (["--max-attempts", "0"], "--max-attempts 0"),
    ],
)
def test_a_bad_submission_is_refused_and_nothing_is_queued(endpoints, capsys, args, fragment):
    queue, _ = endpoints
    code, _, err = cli(capsys, "submit", CONFIG, *args)
    assert code == 2
    assert_one_line_error(err, fragment)
    assert queued_messages(queue) == 0
    assert client("s3").list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0


def test_a_missing_config_file_is_a_usage_error(endpoints, capsys, tmp_path):
    code, _, err = cli(capsys, "submit", str(tmp_path / "nope.yaml"))
    assert code == 2
    assert_one_line_error(err, "nope.yaml")


def test_an_unknown_queue_is_a_one_line_error_and_nothing_is_written(endpoints, capsys, aws):
    code, _, err = cli(capsys, "submit", CONFIG, "--queue", f"{aws}/123456789012/no-such-queue")
    assert code == 1
    assert_one_line_error(err, "no-such-queue", "does not exist")
    assert client("s3").list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0


def test_a_queue_that_is_not_a_url_is_a_usage_error(endpoints, capsys):
    code, _, err = cli(capsys, "submit", CONFIG, "--queue", "jobs")
    assert code == 2
    assert_one_line_error(err, "not an SQS URL")


def test_a_missing_bucket_is_a_one_line_error_and_nothing_is_queued(endpoints, capsys):
    queue, _ = endpoints
    code, _, err = cli(capsys, "submit", CONFIG, "--store", "s3://no-such-bucket/jobs")
    assert code == 1
    assert_one_line_error(err, "no-such-bucket")
    assert queued_messages(queue) == 0


def test_no_queue_or_store_configured(aws, capsys, monkeypatch):
    monkeypatch.delenv("MAMBA_QUEUE_URL", raising=False)
    monkeypatch.delenv("MAMBA_JOBS_STORE", raising=False)
    code, _, err = cli(capsys, "jobs", "list")
    assert code == 2
    assert_one_line_error(err, "MAMBA_JOBS_STORE")
    code, _, err = cli(capsys, "submit", CONFIG, "--store", "s3://x/jobs")
    assert code == 2
    assert_one_line_error(err, "MAMBA_QUEUE_URL")


def test_no_credentials_is_a_usage_error(endpoints, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    for command in (["submit", CONFIG], ["jobs", "list"]):
        proc = subprocess.run([sys.executable, "-m", "mamba_training", *command], capture_output=True, text=True,
                              timeout=60, env=env, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert_one_line_error(proc.stderr, "no AWS credentials")


@pytest.mark.parametrize("command", ["show", "cancel", "logs"])
def test_an_unknown_job_id_is_a_usage_error(endpoints, capsys, command):
    code, _, err = cli(capsys, "jobs", command, "job-nope")
    assert code == 2
    assert_one_line_error(err, "job-nope", "not found")


def test_cancel_a_queued_job_and_cancel_twice(endpoints, capsys):
    job = submit(capsys)
    code, out, _ = cli(capsys, "jobs", "cancel", job["id"])
    assert code == 0 and "cancelled" in out
    code, _, err = cli(capsys, "jobs", "cancel", job["id"])
    assert code == 2
    assert_one_line_error(err, "already cancelled")


def test_cancel_a_running_job_only_requests_it(endpoints, capsys):
    _, store = endpoints
    job = submit(capsys)
    jobs = JobsStore(store)
    jobs.update(job["id"], lambda s: s.__class__(**{**s.__dict__, "state": "running", "holder": "i-1/1"}))
    code, out, _ = cli(capsys, "jobs", "cancel", job["id"], "--json")
    after = json.loads(out)
    assert code == 0 and after["state"] == "running" and after["cancel_requested"] is True


def test_two_claimants_racing_for_one_job_one_wins(endpoints, capsys):
    _, store = endpoints
    job = submit(capsys)
    jobs = [JobsStore(store) for _ in range(8)]
    won: list[str] = []
    barrier = threading.Barrier(len(jobs))

    def claim(i: int) -> None:
        barrier.wait()
        if jobs[i].claim(job["id"], f"agent-{i}", 60) is not None:
            won.append(f"agent-{i}")

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1, won
    lease, _ = jobs[0].lease(job["id"])
    assert lease.holder == won[0]


def test_a_lease_is_free_once_expired_or_released_and_renewal_is_fenced(endpoints, capsys):
    _, store = endpoints
    job = submit(capsys)["id"]
    jobs = JobsStore(store)
    etag = jobs.claim(job, "a", 60, now=1000.0)
    assert etag is not None
    assert jobs.claim(job, "b", 60, now=1030.0) is None  # still held
    taken = jobs.claim(job, "b", 60, now=1061.0)  # expired: b takes over
    assert taken is not None
    from mamba_training.fleet.jobs import LeaseLost

    with pytest.raises(LeaseLost):
        jobs.renew(job, "a", etag, 60)  # a's ETag is stale: it must stop
    jobs.release(job, "b", taken)
    assert jobs.claim(job, "c", 60) is not None


def test_reconcile_once_scales_from_zero_to_the_nodes_needed_within_max(endpoints, capsys):
    make_fleet(desired=0, max_size=3)
    submit(capsys, "--nodes", "2")
    submit(capsys, "--nodes", "2")
    code, out, err = cli(capsys, "reconcile", "--once", "--group", ASG, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["desired_before"], result["need"], result["desired"]) == (0, 4, 3)
    assert group()["DesiredCapacity"] == 3


def test_reconcile_honours_a_schedule_in_force(endpoints, capsys):
    make_fleet(desired=0, max_size=3)
    client("autoscaling").put_scheduled_update_group_action(
        AutoScalingGroupName=ASG, ScheduledActionName="always-off", Recurrence="* * * * *", MinSize=0, MaxSize=0)
    submit(capsys)
    code, out, err = cli(capsys, "reconcile", "--once", "--group", ASG, "--json")
    assert code == 0, err
    assert json.loads(out)["desired"] == 0 and group()["DesiredCapacity"] == 0


def test_reconcile_returns_a_running_job_whose_lease_expired(endpoints, capsys):
    queue, store = endpoints
    make_fleet(desired=0, max_size=3)
    job = submit(capsys)["id"]
    jobs = JobsStore(store)
    client("sqs").purge_queue(QueueUrl=queue)
    jobs.claim(job, "gone", 60, now=1000.0)  # long expired
    jobs.update(job, lambda s: s.__class__(**{**s.__dict__, "state": "running", "holder": "gone", "attempts": 1}))
    code, out, err = cli(capsys, "reconcile", "--once", "--group", ASG, "--json")
    assert code == 0, err
    assert json.loads(out)["returned"] == [job]
    state, _ = jobs.state(job)
    assert (state.state, state.attempts, state.holder) == ("queued", 0, None)
    assert queued_messages(queue) == 1


def test_reconcile_needs_a_group(endpoints, capsys, monkeypatch):
    monkeypatch.delenv("MAMBA_ASG_NAME", raising=False)
    code, _, err = cli(capsys, "reconcile", "--once")
    assert code == 2
    assert_one_line_error(err, "MAMBA_ASG_NAME")
    code, _, err = cli(capsys, "reconcile", "--once", "--group", "no-such-asg")
    assert code == 1
    assert_one_line_error(err, "no-such-asg")


def test_node_slots_of_a_multi_node_job_are_claimed_once_each(endpoints, capsys):
    _, store = endpoints
    job = submit(capsys, "--nodes", "3")["id"]
    jobs = JobsStore(store)
    claims = [jobs.claim_slot(job, 3, f"agent-{i}", 60) for i in range(4)]
    assert [c[0] if c else None for c in claims] == [0, 1, 2, None]  # a fourth agent gets nothing
    assert jobs.free_slots(job, 3) == []
    jobs.release(job, "agent-1", claims[1][1], slot=1)
    assert jobs.free_slots(job, 3) == [1]
    assert jobs.claim_slot(job, 3, "agent-4", 60)[0] == 1


def test_agent_bad_input_is_one_line(endpoints, capsys, aws):
    code, _, err = cli(capsys, "agent", "--imds-url", "nonsense")
    assert code == 2
    assert_one_line_error(err, "--imds-url")
    code, _, err = cli(capsys, "agent", "--imds-url", "off", "--queue", f"{aws}/123456789012/no-such-queue")
    assert code == 1
    assert_one_line_error(err, "no-such-queue", "does not exist")


def test_an_idle_agent_outside_a_group_exits_when_told(endpoints, capsys, tmp_path):
    code, _, err = cli(capsys, "agent", "--imds-url", "off", "--exit-when-idle", "--idle-seconds", "0",
                       "--wait-seconds", "0", "--workdir", str(tmp_path / "agent"))
    assert code == 0, err
    assert "idle" in err
