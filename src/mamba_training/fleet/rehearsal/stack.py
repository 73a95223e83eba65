"""The Terraform stack users deploy, applied to the rehearsal's moto server.

The stack (infrastructure/aws) is copied into the rehearsal's folder and pointed at moto by a
`*_override.tf` written only in that copy; the AWS provider comes from a local filesystem mirror
when one is found (MAMBA_TF_PROVIDER_MIRROR or the usual plugin roots), else from the registry.
Terraform runs as a child process of the rehearsal (its own process group), so Ctrl-C ends it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from mamba_training.errors import UsageError
from mamba_training.fleet.rehearsal.procs import Child, Processes, RehearsalError

ENVIRONMENT = "rehearsal"
PROJECT = "mamba-training"
MIRROR_ROOTS = (
    Path("/opt/tf-plugins"),
    Path.home() / ".terraform.d" / "plugins",
    Path.home() / ".local" / "share" / "terraform" / "plugins",
    Path("/usr/local/share/terraform/plugins"),
    Path("/usr/share/terraform/plugins"),
)
# Every service the stack talks to; the moto server answers them all on one URL.
SERVICES = ("autoscaling", "cloudwatch", "ec2", "iam", "kms", "logs", "s3", "sqs", "ssm", "sts")
COPY_IGNORE = shutil.ignore_patterns(".terraform", "terraform.tfstate*", "*.tfplan", "terraform.tfvars",
                                     "*_override.tf", "__pycache__", ".terraform.lock.hcl", "tests", "checkov")
# The apply takes about a minute on an idle machine (docs/rehearse.md, "How long it takes"); a
# busy one stretches the provider's start-up, never its fixed waits.
APPLY_TIMEOUT = 600.0


@dataclass(frozen=True)
class Outputs:
    """What the rehearsal needs from `terraform output`."""

    bucket: str
    asg_name: str
    queue_url: str
    region: str
    raw: dict

    @property
    def jobs_store(self) -> str:
        return f"s3://{self.bucket}/jobs"


def default_stack_dir() -> Path:
    """MAMBA_TRAINING_STACK, else infrastructure/aws of the checkout this package runs from."""
    configured = os.environ.get("MAMBA_TRAINING_STACK")
    if configured:
        return Path(configured).expanduser()
    return Path(__file__).resolve().parents[4] / "infrastructure" / "aws"


def find_terraform() -> str:
    found = shutil.which("terraform")
    if not found:
        raise RehearsalError("terraform not found on PATH: install Terraform >= 1.7 "
                             "(https://developer.hashicorp.com/terraform/install)")
    return found


def provider_mirror() -> Path | None:
    configured = os.environ.get("MAMBA_TF_PROVIDER_MIRROR")
    roots = [Path(configured).expanduser()] if configured else list(MIRROR_ROOTS)
    for root in roots:
        if (root / "registry.terraform.io" / "hashicorp" / "aws").is_dir():
            return root
    if configured:
        raise UsageError(f"MAMBA_TF_PROVIDER_MIRROR={configured} has no registry.terraform.io/hashicorp/aws")
    return None


def plugin_cache() -> Path:
    """A provider cache shared by rehearsals (the provider is ~700 MB: linked from here, not copied each time)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = base / "mamba-training" / "terraform-plugins"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cli_config(directory: Path) -> Path:
    mirror = provider_mirror()
    path = directory / "terraform.tfrc"
    # No lock file travels with the stack's copy, so the cache is used only when allowed to fill one in.
    cache = (f'plugin_cache_dir = "{plugin_cache()}"\n'
             "plugin_cache_may_break_dependency_lock_file = true\n")
    path.write_text(cache + ("" if mirror is None else (
        "provider_installation {\n"
        f'  filesystem_mirror {{\n    path    = "{mirror}"\n    include = ["registry.terraform.io/*/*"]\n  }}\n'
        '  direct {\n    exclude = ["registry.terraform.io/*/*"]\n  }\n'
        "}\n")))
    return path


def override(url: str) -> str:
    endpoints = "\n".join(f'    {service} = "{url}"' for service in SERVICES)
    return ('provider "aws" {\n'
            '  access_key                  = "testing"\n'
            '  secret_key                  = "testing"\n'
            "  skip_credentials_validation = true\n"
            "  skip_requesting_account_id  = true\n"
            "  skip_metadata_api_check     = true\n"
            "  s3_use_path_style           = true\n\n"
            f"  endpoints {{\n{endpoints}\n  }}\n"
            "}\n")


def tf_vars(ami: str, max_instances: int, instance_type: str, region: str) -> list[str]:
    """The stack's variables for a rehearsal.

    deny_insecure_transport=false (as `deploy.sh --endpoint` sets it): moto serves plain HTTP on
    loopback and evaluates bucket policies, so the TLS-only statement would deny every request.
    """
    values = {"region": region, "environment": ENVIRONMENT, "project": PROJECT, "ami_id": ami,
              "instance_types": json.dumps([instance_type]), "min_instances": "0",
              "max_instances": str(max_instances), "desired_instances": "0", "force_destroy_bucket": "true",
              "run_name": ENVIRONMENT, "deny_insecure_transport": "false"}
    return [f"-var={key}={value}" for key, value in values.items()]


class Stack:
    """A copy of the stack under `directory`, applied to the moto server at `url`."""

    def __init__(self, processes: Processes, directory: Path, url: str, source: Path | None = None) -> None:
        self.processes = processes
        self.source = source or default_stack_dir()
        if not (self.source / "asg.tf").is_file():
            raise UsageError(f"no Terraform stack at {self.source} (set MAMBA_TRAINING_STACK to infrastructure/aws)")
        self.terraform = find_terraform()
        self.dir = directory / "stack"
        self.url = url
        self.env: dict[str, str] = {}

    def prepare(self) -> None:
        shutil.copytree(self.source, self.dir, ignore=COPY_IGNORE)
        (self.dir / "rehearsal_override.tf").write_text(override(self.url))
        env = {k: v for k, v in os.environ.items() if not k.startswith("TF_") and not k.startswith("AWS_")}
        env.update(TF_CLI_CONFIG_FILE=str(cli_config(self.dir.parent)), CHECKPOINT_DISABLE="1",
                   TF_IN_AUTOMATION="1", TF_INPUT="0", TF_DATA_DIR=str(self.dir / ".terraform"))
        self.env = env

    def _tf(self, name: str, *args: str, timeout: float = APPLY_TIMEOUT) -> str:
        child = self.processes.start(f"terraform-{name}", [self.terraform, *args, "-no-color"], self.env, cwd=self.dir)
        try:
            child.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            child.stop()
            raise RehearsalError(f"terraform {name} did not finish within {timeout:.0f} s (log {child.log})") from None
        if child.proc.returncode != 0:
            raise RehearsalError(f"terraform {name} exited {child.proc.returncode}: {first_error(child)} "
                                 f"(log {child.log})")
        return child.log.read_text()

    def start_apply(self, ami: str, max_instances: int, instance_type: str, region: str) -> Child:
        """`terraform init`, then `terraform apply` started and left running (see `resources_up`)."""
        self.started = time.monotonic()
        self.started_at = time.time()
        self._tf("init", "init", "-input=false")
        return self.processes.start("terraform-apply", [self.terraform, "apply", "-auto-approve", "-input=false",
                                                        "-no-color", *tf_vars(ami, max_instances, instance_type,
                                                                              region)], self.env, cwd=self.dir)

    def finish(self, apply: Child, timeout: float = APPLY_TIMEOUT) -> Outputs:
        """Wait for the apply; its outputs."""
        try:
            apply.proc.wait(max(1.0, timeout - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            apply.stop()
            raise RehearsalError(f"terraform apply did not finish within {timeout:.0f} s (log {apply.log})") from None
        if apply.proc.returncode != 0:
            raise RehearsalError(f"terraform apply exited {apply.proc.returncode}: {first_error(apply)} "
                                 f"(log {apply.log})")
        # The apply usually returned long before the rehearsal asks (after its jobs): its log's last
        # write is when it ended.
        self.seconds = min(time.monotonic() - self.started, apply.log.stat().st_mtime - self.started_at)
        child = self.processes.start("terraform-output", [self.terraform, "output", "-json"], self.env, cwd=self.dir)
        child.proc.wait(60)
        text = child.log.read_text()
        try:
            raw = {k: v["value"] for k, v in json.loads(text[text.index("{"):]).items()}
        except (ValueError, KeyError):
            raise RehearsalError(f"terraform output -json gave no outputs (log {child.log})") from None
        return Outputs(bucket=raw["bucket_name"], asg_name=raw["autoscaling_group_name"],
                       queue_url=raw["job_queue_url"], region=raw["region"], raw=raw)


def first_error(child: Child) -> str:
    lines = [line.strip("│ ").strip() for line in child.tail(6000).splitlines() if "Error" in line]
    return lines[0] if lines else "see its log"


def resources_up(region: str) -> Outputs | None:
    """The stack's group, queue and bucket once they exist in moto (names as locals.tf makes them), else None.

    The apply goes on for about half a minute after these exist (the bucket's lifecycle rules and
    the queue's redrive policy, whose provider waits are fixed); the fleet starts now, and `finish`
    checks the outputs against these at the end.
    """
    from mamba_training.aws.session import client

    name = f"{PROJECT}-{ENVIRONMENT}"
    groups = client("autoscaling", region=region).describe_auto_scaling_groups(
        AutoScalingGroupNames=[f"{name}-training-asg"])["AutoScalingGroups"]
    if not groups:
        return None
    sqs = client("sqs", region=region)
    try:
        queue_url = sqs.get_queue_url(QueueName=f"{name}-training-jobs")["QueueUrl"]
    except Exception:  # not created yet
        return None
    s3 = client("s3", region=region)
    buckets = [b["Name"] for b in s3.list_buckets()["Buckets"] if b["Name"].startswith(f"{name}-ckpt-")]
    if len(buckets) != 1:
        return None
    return Outputs(bucket=buckets[0], asg_name=groups[0]["AutoScalingGroupName"], queue_url=queue_url,
                   region=region, raw={})


__all__ = ["resources_up", "Stack", "Outputs", "find_terraform", "default_stack_dir", "ENVIRONMENT", "PROJECT"]
