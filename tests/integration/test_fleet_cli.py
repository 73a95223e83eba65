"""Fleet commands (status, scale, stop, logs, prices) end to end against the moto server over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mamba_training.aws.session import client
from tests.aws.moto_fleet import (
    ASG, ENV, LOG_GROUP, PROJECT, assert_one_line_error, cli, denying_endpoint, group, instance_states,
    make_fleet, run_instance,
)


def test_status_shows_group_capacity_and_each_instance(aws, capsys):
    make_fleet(desired=2)
    tagged = run_instance({"Project": PROJECT, "Environment": ENV, "Run": "tiny", "Step": "1200"})
    run_instance({"Project": "other", "Environment": ENV})
    code, out, _ = cli(capsys, "status")
    assert code == 0
    assert f"{ASG}  desired 2  min 0  max 4  instances 3" in out
    assert tagged in out and "tiny" in out and "1200" in out and "on-demand" in out
    code, out, _ = cli(capsys, "status", "--json")
    data = json.loads(out)
    assert (data["desired"], data["min"], data["max"]) == (2, 0, 4)
    assert sorted(i["type"] for i in data["instances"]) == ["g4dn.xlarge", "g4dn.xlarge", "g5.xlarge"]
    mine = next(i for i in data["instances"] if i["id"] == tagged)
    assert mine["run"] == "tiny" and mine["step"] == 1200 and mine["state"] == "running"
    assert mine["availability_zone"].startswith("us-east-1") and mine["private_ip"]
    assert 0 <= mine["uptime_s"] < 600


def test_status_with_a_store_shows_run_and_step_from_the_records(aws, capsys, tmp_path):
    make_fleet(desired=1)
    (instance,) = [i for r in client("ec2").describe_instances()["Reservations"] for i in r["Instances"]]
    host = "ip-" + instance["PrivateIpAddress"].replace(".", "-")
    for segment, step in ((f"20261128T100000Z-{host}-41", 120), (f"20261128T090000Z-ip-10-9-9-9-7", 80)):
        folder = tmp_path / "runs" / "tiny" / "records" / segment
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text(json.dumps({"time": "2026-11-28T10:05:00Z", "step": step}) + "\n")
    code, out, _ = cli(capsys, "status", "--store", str(tmp_path / "runs" / "tiny"), "--json")
    assert code == 0
    (shown,) = json.loads(out)["instances"]
    assert (shown["id"], shown["run"], shown["step"]) == (instance["InstanceId"], "tiny", 120)


def test_scale_changes_desired_capacity(aws, capsys):
    make_fleet(desired=1)
    code, out, _ = cli(capsys, "scale", "3")
    assert code == 0 and "desired capacity 1 -> 3" in out
    assert group()["DesiredCapacity"] == 3
    code, out, _ = cli(capsys, "scale", "0", "--json")
    assert code == 0 and json.loads(out) == {"group": ASG, "desired_before": 3, "desired": 0}
    assert group()["DesiredCapacity"] == 0


def test_scale_beyond_max_is_refused_and_changes_nothing(aws, capsys):
    make_fleet(desired=1, max_size=4)
    code, _, err = cli(capsys, "scale", "5")
    assert code == 2
    assert_one_line_error(err, ASG, "5", "0..4")
    assert group()["DesiredCapacity"] == 1


def test_stop_scales_to_zero_and_terminates_only_the_projects_instances(aws, capsys):
    make_fleet(desired=2)
    client("autoscaling").update_auto_scaling_group(AutoScalingGroupName=ASG, MinSize=1)
    stray = run_instance({"Project": PROJECT, "Environment": ENV})  # outside the group, still ours
    other_env = run_instance({"Project": PROJECT, "Environment": "prod"})
    other_project = run_instance({"Project": "someone-else", "Environment": ENV})
    code, out, _ = cli(capsys, "stop", "--yes", "--json")
    assert code == 0
    result = json.loads(out)
    assert stray in result["terminated"] and result["group_found"] and result["desired_before"] == 2
    g = group()
    assert (g["DesiredCapacity"], g["MinSize"]) == (0, 0)
    states = instance_states()
    assert states[stray] == "terminated"
    assert states[other_env] == "running" and states[other_project] == "running"
    assert [s for i, s in states.items() if i not in (other_env, other_project) and s != "terminated"] == []


def test_stop_asks_first_and_a_no_changes_nothing(aws):
    make_fleet(desired=2)
    proc = subprocess.run([sys.executable, "-m", "mamba_training", "stop"], input="n\n", capture_output=True,
                          text=True, timeout=60, env=os.environ)
    assert proc.returncode == 1 and "aborted" in proc.stderr and "Traceback" not in proc.stderr
    assert group()["DesiredCapacity"] == 2
    assert sorted(set(instance_states().values())) == ["running"]


def _log_events(messages: list[tuple[int, str]], stream: str = "i-0abc/train") -> None:
    logs = client("logs")
    try:
        logs.create_log_group(logGroupName=LOG_GROUP)
    except logs.exceptions.ResourceAlreadyExistsException:
        pass
    try:
        logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
    except logs.exceptions.ResourceAlreadyExistsException:
        pass
    now = int(time.time() * 1000)
    logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=stream,
                        logEvents=[{"timestamp": now - age_s * 1000, "message": m} for age_s, m in messages])


def test_logs_since_and_filter(aws, capsys):
    _log_events([(7200, "old line"), (600, '{"msg": "step 10 loss 3.2"}'), (300, '{"msg": "checkpoint step 20"}')])
    code, out, _ = cli(capsys, "logs", "--since", "1h")
    assert code == 0
    assert "old line" not in out and "step 10 loss 3.2" in out and "checkpoint step 20" in out
    assert out.index("step 10") < out.index("checkpoint step 20")
    code, out, _ = cli(capsys, "logs", "--since", "3h", "--filter", "checkpoint", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["message"] for r in rows] == ['{"msg": "checkpoint step 20"}']
    assert rows[0]["logStreamName"] == "i-0abc/train"


def test_logs_follow_shows_new_events_once_and_stops_when_bounded(aws):
    _log_events([(60, "before follow")])
    proc = subprocess.Popen([sys.executable, "-m", "mamba_training", "logs", "--follow", "--since", "5m",
                             "--poll-seconds", "0.2", "--follow-for", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    first = proc.stdout.readline()
    assert "before follow" in first
    _log_events([(0, "arrived while following")])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.count("arrived while following") == 1 and out.count("before follow") == 0


def test_logs_follow_stops_cleanly_on_ctrl_c(aws):
    _log_events([(60, "first")])
    proc = subprocess.Popen([sys.executable, "-m", "mamba_training", "logs", "--follow", "--poll-seconds", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)
    assert "first" in proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_logs_missing_group_is_a_one_line_error(aws, capsys):
    code, _, err = cli(capsys, "logs", "--env", "nope")
    assert code == 1
    assert_one_line_error(err, "/aws/ec2/mamba-training-nope/training", "not found")


def test_bad_since_is_a_usage_error(aws, capsys):
    code, _, err = cli(capsys, "logs", "--since", "yesterday-ish")
    assert code == 2
    assert_one_line_error(err, "--since", "yesterday-ish")


def test_prices_lists_spot_per_az_beside_on_demand(aws, capsys):
    code, out, _ = cli(capsys, "prices", "-t", "g4dn.xlarge,g5.xlarge", "--json")
    assert code == 0
    data = json.loads(out)
    rows = data["prices"]
    assert {r["instance_type"] for r in rows} == {"g4dn.xlarge", "g5.xlarge"}
    assert len({r["availability_zone"] for r in rows}) > 1
    g4 = next(r for r in rows if r["instance_type"] == "g4dn.xlarge")
    assert g4["on_demand_usd_per_hour"] == 0.526
    assert g4["stale"] is True  # moto's placeholder prices date from 2006
    code, out, _ = cli(capsys, "prices", "-t", "g4dn.xlarge")
    assert code == 0 and "g4dn.xlarge" in out and "$0.5260" in out and "stale" in out


def test_missing_group_is_a_one_line_error_naming_it(aws, capsys):
    make_fleet()
    code, _, err = cli(capsys, "status", "--env", "prod")
    assert code == 1
    assert_one_line_error(err, "mamba-training-prod-training-asg", "not found")
    code, _, err = cli(capsys, "scale", "1", "--project", "ghost")
    assert code == 1
    assert_one_line_error(err, "ghost-dev-training-asg")


def test_unknown_region_is_a_usage_error(aws, capsys):
    code, _, err = cli(capsys, "status", "--region", "mars-1")
    assert code == 2
    assert_one_line_error(err, "unknown AWS region 'mars-1'")
    code, _, err = cli(capsys, "prices", "--region", "us-east-9")
    assert code == 2
    assert_one_line_error(err, "us-east-9")


def test_unknown_profile_is_a_usage_error(aws, capsys):
    make_fleet()
    code, _, err = cli(capsys, "status", "--profile", "no-such-profile")
    assert code == 2
    assert_one_line_error(err, "AWS profile 'no-such-profile' not found")


def test_access_denied_is_a_one_line_runtime_error(monkeypatch, capsys):
    with denying_endpoint() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        for command in (["status"], ["scale", "1"], ["stop", "--yes"], ["logs"]):
            code, _, err = cli(capsys, *command)
            assert code == 1, command
            assert_one_line_error(err, "access denied", "AccessDenied")


def test_no_credentials_is_a_usage_error(aws, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    for command in (["status"], ["stop", "--yes"]):
        proc = subprocess.run([sys.executable, "-m", "mamba_training", *command], capture_output=True, text=True,
                              timeout=60, env=env, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert_one_line_error(proc.stderr, "no AWS credentials")
