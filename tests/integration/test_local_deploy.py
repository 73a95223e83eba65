"""`deploy.sh --endpoint URL`: the documented offline deploy, applied for real to the moto server.

The script gets nothing the tests used to write for it: no provider override, no CLI config, no
SSM parameter, no AWS_ENDPOINT_URL. Only MAMBA_TF_PROVIDER_MIRROR (the documented variable) when
the machine has a provider mirror.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from infra.terraform_env import copy_stack, provider_mirror, tool
from mamba_training.aws.session import client

pytestmark = pytest.mark.slow

REGION = "us-west-2"


def deploy_sh(stack: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(stack / "deploy.sh"), *args], cwd=stack, env=env, capture_output=True, text=True,
                            timeout=600, stdin=subprocess.DEVNULL)
    return result


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_deploy_sh_endpoint_deploys_a_usable_stack_to_a_local_endpoint_and_destroys_it(aws, tmp_path: Path) -> None:
    tool("terraform")
    stack = copy_stack(tmp_path / "stack")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_") and k != "AWS_ENDPOINT_URL"}
    mirror = provider_mirror()
    if mirror is not None:
        env["MAMBA_TF_PROVIDER_MIRROR"] = str(mirror)
    env.update(CHECKPOINT_DISABLE="1", TF_IN_AUTOMATION="1")

    deployed = ok(deploy_sh(stack, env, "--endpoint", aws, "--yes", "deploy", "--", "-no-color"))
    assert f"workspace=dev-{REGION}-local endpoint={aws}" in deployed.stderr
    assert "local endpoint: SSM parameter /mamba-training/local/ami-id = ami-" in deployed.stderr
    assert (stack / "local_endpoint_override.tf").is_file()
    outputs = dict(re.findall(r'^(\w+) = "?([^"\n]*)"?$', ok(deploy_sh(stack, env, "--endpoint", aws, "outputs")).stdout,
                              re.M))
    bucket = outputs["bucket_name"]
    assert outputs["run_store"] == f"s3://{bucket}/runs/dev"

    # The local bucket takes plain-HTTP requests: no TLS-only policy there. (Reads only: the provider's
    # force_destroy of a versioned bucket holding object versions never ends on moto.)
    s3 = client("s3", region=REGION)
    assert s3.list_objects_v2(Bucket=bucket, Prefix="runs/dev/")["KeyCount"] == 0
    with pytest.raises(Exception, match="NoSuchBucketPolicy"):
        s3.get_bucket_policy(Bucket=bucket)
    parameter = client("ssm", region=REGION).get_parameter(Name="/mamba-training/local/ami-id")["Parameter"]["Value"]
    template = client("ec2", region=REGION).describe_launch_template_versions(
        LaunchTemplateId=outputs["launch_template_id"])["LaunchTemplateVersions"][0]
    assert template["LaunchTemplateData"]["ImageId"] == parameter

    ok(deploy_sh(stack, env, "--endpoint", aws, "--yes", "destroy", "--", "-no-color"))
    assert client("s3", region=REGION).list_buckets()["Buckets"] == []

    # A later run without --endpoint talks to AWS again: the local override is gone.
    ok(deploy_sh(stack, env, "validate"))
    assert not (stack / "local_endpoint_override.tf").exists()
