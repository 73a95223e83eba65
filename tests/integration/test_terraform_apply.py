"""The whole stack applied for real against the moto server, asserted through boto3, destroyed.

dev goes through deploy.sh (deploy = init + validate + plan + apply, outputs, destroy; `deploy.sh
validate` is in tests/infra) with the AMI read
from an SSM parameter; prod goes through terraform directly with an explicit ami_id, scales to two
instances, and its rendered user data is checked as a program (bash -n, shellcheck, the systemd
unit through systemd-analyze, config.yaml through the package's own config loader).
moto refuses to create /aws/service/... parameters, so the DLAMI parameter name itself is covered
by the mocked plan in tests/infra (validation.tftest.hcl, run "defaults_plan").
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from infra.terraform_env import copy_stack, initialized_stack, run, terraform_env, tool, write_cli_config, write_moto_override
from mamba_training.aws.session import client
from mamba_training.config import build_config

# prod shares the session's initialized stack with tests/infra (group "terraform"). dev and prod are
# applied and destroyed side by side: the provider mostly waits on moto (~25 s per SQS queue and
# ~55 s for the lifecycle rules before it believes they are in place).
pytestmark = pytest.mark.slow

REGION = "us-west-2"
METRICS = ["Loss", "ValLoss", "TokensPerSecond", "Step", "CheckpointSeconds", "Interruptions", "CostUSD"]


def c(service: str):
    return client(service, region=REGION)


def an_ami() -> str:
    return c("ec2").describe_images(Owners=["amazon"])["Images"][0]["ImageId"]


def assert_nothing_left(environment: str) -> None:
    name = f"mamba-training-{environment}"
    assert [b["Name"] for b in c("s3").list_buckets()["Buckets"]] == []
    assert c("autoscaling").describe_auto_scaling_groups()["AutoScalingGroups"] == []
    assert c("ec2").describe_launch_templates()["LaunchTemplates"] == []
    assert [r["RoleName"] for r in c("iam").list_roles()["Roles"] if r["RoleName"].startswith(name)] == []
    assert c("iam").list_instance_profiles()["InstanceProfiles"] == []
    assert c("logs").describe_log_groups(logGroupNamePrefix=f"/aws/ec2/{name}")["logGroups"] == []
    assert c("sqs").list_queues().get("QueueUrls", []) == []
    assert c("cloudwatch").list_dashboards()["DashboardEntries"] == []
    groups = c("ec2").describe_security_groups()["SecurityGroups"]
    assert [g["GroupName"] for g in groups if g["GroupName"].startswith(name)] == []


def assert_bucket(bucket: str) -> None:
    s3 = c("s3")
    rule = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    deny = policy["Statement"][0]
    assert deny["Effect"] == "Deny" and deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert rules["expire-noncurrent-versions"]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 1
    assert rules["abort-incomplete-multipart-uploads"]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 3


def launch_template_data(template_id: str) -> dict:
    versions = c("ec2").describe_launch_template_versions(LaunchTemplateId=template_id)["LaunchTemplateVersions"]
    return versions[-1]["LaunchTemplateData"]


def assert_launch_template(template_id: str, ami: str) -> dict:
    data = launch_template_data(template_id)
    assert data["ImageId"] == ami
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 2
    ebs = data["BlockDeviceMappings"][0]["Ebs"]
    assert ebs["Encrypted"] is True and ebs["VolumeType"] == "gp3" and ebs["VolumeSize"] == 200
    assert "instance-profile/mamba-training-" in data["IamInstanceProfile"]["Arn"]
    return data


def assert_group(environment: str, types: list[str], price: str, sizes: tuple[int, int, int]) -> dict:
    name = f"mamba-training-{environment}-training-asg"
    groups = c("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    assert len(groups) == 1, f"no group {name}"
    group = groups[0]
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == sizes
    assert group["CapacityRebalance"] is True
    policy = group["MixedInstancesPolicy"]
    distribution = policy["InstancesDistribution"]
    assert distribution["OnDemandBaseCapacity"] == 0
    assert distribution["OnDemandPercentageAboveBaseCapacity"] == 0
    assert distribution["SpotAllocationStrategy"] == "price-capacity-optimized"
    assert float(distribution["SpotMaxPrice"]) == float(price)
    assert [o["InstanceType"] for o in policy["LaunchTemplate"]["Overrides"]] == types
    tags = {t["Key"]: t for t in group["Tags"]}
    for key, value in (("Project", "mamba-training"), ("Environment", environment)):
        assert tags[key]["Value"] == value and tags[key]["PropagateAtLaunch"] is True
    return group


def assert_role_and_profile(environment: str) -> None:
    iam = c("iam")
    roles = [r for r in iam.list_roles()["Roles"] if r["RoleName"].startswith(f"mamba-training-{environment}-instance-")]
    assert len(roles) == 1
    role = roles[0]["RoleName"]
    profiles = iam.list_instance_profiles_for_role(RoleName=role)["InstanceProfiles"]
    assert len(profiles) == 1
    policy = iam.get_role_policy(RoleName=role, PolicyName=f"mamba-training-{environment}-training")["PolicyDocument"]
    if isinstance(policy, str):
        policy = json.loads(policy)
    statements = {s["Sid"]: s for s in policy["Statement"]}
    assert statements["PutOwnMetrics"]["Condition"]["StringEquals"]["cloudwatch:namespace"] == ["MambaTraining", "CWAgent"]
    assert statements["ReadWriteRunPrefix"]["Resource"].endswith("/runs/*")
    assert "SessionManager" in statements and "OwnJobQueue" in statements
    assert not iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]  # no broad managed policies


def assert_logs_queue_dashboard(environment: str, retention: int) -> None:
    groups = c("logs").describe_log_groups(logGroupNamePrefix=f"/aws/ec2/mamba-training-{environment}/training")["logGroups"]
    assert [(g["logGroupName"], g["retentionInDays"]) for g in groups] == [
        (f"/aws/ec2/mamba-training-{environment}/training", retention)]
    sqs = c("sqs")
    queue = sqs.get_queue_url(QueueName=f"mamba-training-{environment}-training-jobs")["QueueUrl"]
    dlq = sqs.get_queue_url(QueueName=f"mamba-training-{environment}-training-jobs-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.loads(sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["RedrivePolicy"])["Attributes"]["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == dlq_arn and int(redrive["maxReceiveCount"]) == 5
    body = json.loads(c("cloudwatch").get_dashboard(DashboardName=f"mamba-training-{environment}-training")["DashboardBody"])
    expressions = [m[0]["expression"] for w in body["widgets"] if w["type"] == "metric"
                   for m in w["properties"]["metrics"] if isinstance(m[0], dict)]
    for metric in METRICS:
        assert any(f'MetricName="{metric}"' in e and "{MambaTraining,Project,Environment,Run}" in e
                   and f'Environment="{environment}"' in e and e.startswith("SEARCH(") for e in expressions), metric


def deploy_sh(stack: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run([str(stack / "deploy.sh"), "-e", "dev", *args], stack, env, check=False)


def ok(result: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{what} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


class Dev:
    """The dev stack through deploy.sh, in its own copy and workspace, with the AMI from SSM."""

    def __init__(self, moto_url: str, tmp_path: Path) -> None:
        self.ami = an_ami()
        c("ssm").put_parameter(Name="/mamba-training/test/ami-id", Value=self.ami, Type="String")
        self.stack = copy_stack(tmp_path / "dev-stack")
        write_moto_override(self.stack, moto_url)
        self.env = {**terraform_env(write_cli_config(tmp_path)), "TF_VAR_ami_ssm_parameter_name": "/mamba-training/test/ami-id"}
        self.outputs: dict[str, str] = {}
        self.refused: subprocess.CompletedProcess[str] | None = None

    def up(self) -> None:
        deployed = ok(deploy_sh(self.stack, self.env, "deploy", "--yes"), "deploy.sh deploy --yes")
        assert "workspace=dev-us-west-2" in deployed.stderr
        assert (self.stack / "terraform.tfstate.d" / "dev-us-west-2" / "terraform.tfstate").is_file()
        shown = ok(deploy_sh(self.stack, self.env, "outputs"), "deploy.sh outputs")
        self.outputs = dict(re.findall(r'^(\w+) = "?([^"\n]*)"?$', shown.stdout, re.M))

    def down(self) -> None:
        self.refused = subprocess.run([str(self.stack / "deploy.sh"), "-e", "dev", "destroy"], cwd=self.stack,
                                      env=self.env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        ok(deploy_sh(self.stack, self.env, "destroy", "--yes"), "deploy.sh destroy --yes")

    def check(self) -> None:
        values = self.outputs
        bucket = values["bucket_name"]
        assert bucket.startswith("mamba-training-dev-ckpt-")
        assert values["run_store"] == f"s3://{bucket}/runs/dev"
        assert values["autoscaling_group_name"] == "mamba-training-dev-training-asg"
        assert_bucket(bucket)
        assert_launch_template(values["launch_template_id"], self.ami)
        assert_group("dev", ["g4dn.xlarge"], "0.30", (0, 1, 0))
        assert_role_and_profile("dev")
        assert_logs_queue_dashboard("dev", retention=14)
        sg = c("ec2").describe_security_groups(GroupIds=[values["security_group_id"]])["SecurityGroups"][0]
        # Without allowed_ssh_cidrs the only inbound rule is from the group itself (peers of a run).
        assert [(p["IpProtocol"], [g["GroupId"] for g in p["UserIdGroupPairs"]], p["IpRanges"])
                for p in sg["IpPermissions"]] == [("-1", [sg["GroupId"]], [])]
        host, port = values["coordinator_endpoint"].rsplit(":", 1)
        assert port == "29400" and host.count(".") == 3  # the fixed interface's private IP
        group = c("autoscaling").describe_auto_scaling_groups(
            AutoScalingGroupNames=[values["coordinator_autoscaling_group_name"]])["AutoScalingGroups"][0]
        assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (1, 1, 1)


class Prod:
    """The prod stack through terraform itself, in the session's initialized copy, with ami_id."""

    def __init__(self, moto_url: str, tmp_path: Path) -> None:
        self.stack = initialized_stack()
        write_moto_override(self.stack.dir, moto_url)
        self.ami = an_ami()
        self.state = str(tmp_path / "prod.tfstate")
        self.args = ["-input=false", "-no-color", "-var-file=environments/prod.tfvars", f"-var=ami_id={self.ami}",
                     "-state", self.state]
        self.outputs: dict = {}

    def up(self) -> None:
        self.stack.tf("apply", "-auto-approve", *self.args)
        self.outputs = {k: v["value"] for k, v in json.loads(self.stack.tf("output", "-json", "-state", self.state).stdout).items()}

    def down(self) -> None:
        self.stack.tf("destroy", "-auto-approve", *self.args)

    def check(self, tmp_path: Path) -> None:
        assert self.outputs["ami_id"] == self.ami
        assert_bucket(self.outputs["bucket_name"])
        data = assert_launch_template(self.outputs["launch_template_id"], self.ami)
        group = assert_group("prod", ["g4dn.2xlarge", "g4dn.4xlarge", "g5.2xlarge"], "1.00", (0, 8, 2))
        assert len(group["Instances"]) == 2  # moto launches the desired capacity
        assert_role_and_profile("prod")
        assert_logs_queue_dashboard("prod", retention=90)
        assert len(c("ec2").describe_flow_logs()["FlowLogs"]) == 1
        check_user_data(base64.b64decode(data["UserData"]).decode(), tmp_path)


def in_parallel(*steps) -> None:
    """Run the steps in threads (the provider mostly waits on moto); re-raise the first failure."""
    with ThreadPoolExecutor(max_workers=len(steps)) as pool:
        for future in [pool.submit(step) for step in steps]:
            future.result()


def extract(user_data: str, delimiter: str) -> str:
    match = re.search(rf"<<'{delimiter}'\n(.*?)\n{delimiter}\n", user_data, re.S)
    assert match, f"user data has no {delimiter} document"
    return match.group(1)


def check_user_data(user_data: str, tmp_path: Path) -> None:
    script = tmp_path / "user_data.sh"
    script.write_text(user_data)
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run([tool("shellcheck"), "--shell=bash", str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout

    # The config the instance trains with loads through the package's own validation.
    config = build_config(yaml.safe_load(extract(user_data, "MAMBA_CONFIG_EOF")))
    assert re.fullmatch(r"s3://mamba-training-prod-ckpt-\w+/runs/prod", config.checkpoint.store)
    assert (config.spot.imds_url, config.spot.grace_seconds) == ("auto", 90)
    assert (config.aws.project, config.aws.environment, config.aws.region) == ("mamba-training", "prod", REGION)
    assert (config.model.d_model, config.train.seq_len) == (768, 1024)
    assert "torch==2.13.0" in user_data and "git+https://github.com/mamba-training/mamba-training@v0.1.0" in user_data

    agent = json.loads(extract(user_data, "MAMBA_CWAGENT_EOF"))
    files = agent["logs"]["logs_collected"]["files"]["collect_list"]
    assert {f["file_path"] for f in files} == {"/var/log/mamba-training/*.log", "/var/log/mamba-training-setup.log"}
    assert {f["log_group_name"] for f in files} == {"/aws/ec2/mamba-training-prod/training"}
    assert set(agent["metrics"]["metrics_collected"]) == {"cpu", "mem", "disk", "nvidia_gpu"}

    unit = extract(user_data, "MAMBA_UNIT_EOF")
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert settings["Restart"] == "on-failure"
    assert "75" in settings["RestartPreventExitStatus"].split() and settings["SuccessExitStatus"] == "75"
    assert settings["KillSignal"] == "SIGTERM" and int(settings["TimeoutStopSec"]) >= 90
    verify_unit(unit, tmp_path)


def verify_unit(unit: str, tmp_path: Path) -> None:
    """systemd-analyze verify, with the unit's ExecStart and EnvironmentFile present in a scratch root."""
    analyze = tool("systemd-analyze")
    root = tmp_path / "root"
    app = root / "opt" / "mamba-training"
    (app / "work").mkdir(parents=True)
    (app / "env").write_text("AWS_REGION=us-west-2\n")
    for executable in (app / "start_training.sh", app / "venv" / "bin" / "mamba-training"):
        executable.parent.mkdir(parents=True, exist_ok=True)
        executable.write_text("#!/bin/sh\n")
        executable.chmod(0o755)
    (root / "var" / "log" / "mamba-training").mkdir(parents=True)
    unit_dir = root / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    (unit_dir / "mamba-training.service").write_text(unit.replace("/opt/mamba-training", str(app))
                                                     .replace("/var/log/mamba-training", str(root / "var/log/mamba-training")))
    result = subprocess.run([analyze, "verify", str(unit_dir / "mamba-training.service")], capture_output=True, text=True,
                            env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"}, timeout=60)
    # verify only warns (exit 0) about settings it ignores; any line about the unit is a defect.
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "mamba-training.service" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


@pytest.mark.xdist_group("terraform")
def test_dev_and_prod_stacks_apply_against_moto_and_destroy_leaves_nothing(aws: str, tmp_path: Path) -> None:
    dev, prod = Dev(aws, tmp_path), Prod(aws, tmp_path)
    try:
        in_parallel(dev.up, prod.up)
        dev.check()
        prod.check(tmp_path)
        in_parallel(dev.down, prod.down)
    finally:
        (prod.stack.dir / "moto_override.tf").unlink(missing_ok=True)
    assert dev.refused is not None and dev.refused.returncode == 1 and "pass --yes" in dev.refused.stderr
    assert_nothing_left("dev")
    assert_nothing_left("prod")
    instances = c("ec2").describe_instances()["Reservations"]
    assert all(i["State"]["Name"] in ("terminated", "shutting-down") for r in instances for i in r["Instances"])
