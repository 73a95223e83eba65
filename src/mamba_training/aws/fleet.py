"""The training fleet: its auto scaling group and the project's EC2 instances (status, scale, stop).

Names follow the Terraform stack: the group is `<project>-<env>-training-asg`, and every instance
carries the tags Project and Environment (propagated from the group). Instances may also carry
`Run` and `Step` tags; when they do, status shows them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from contextlib import contextmanager
from typing import Any, Iterator

from mamba_training.aws.session import aws_errors, check_region, client
from mamba_training.errors import AwsError, UsageError

LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]


@dataclass(frozen=True)
class Target:
    """Which deployment a command is about."""

    project: str = "mamba-training"
    environment: str = "dev"
    region: str | None = None
    profile: str | None = None

    @property
    def asg_name(self) -> str:
        return f"{self.project}-{self.environment}-training-asg"

    @property
    def log_group(self) -> str:
        return f"/aws/ec2/{self.project}-{self.environment}/training"

    def client(self, service: str, **config: Any):
        return client(service, region=check_region(self.region, self.profile), profile=self.profile, **config)


@dataclass
class InstanceInfo:
    id: str
    type: str
    lifecycle: str  # "spot" or "on-demand"
    availability_zone: str
    private_ip: str | None
    public_ip: str | None
    state: str
    launch_time: str
    uptime_s: float
    run: str | None = None
    step: int | None = None


@dataclass
class GroupInfo:
    name: str
    desired: int
    min: int
    max: int
    instances: list[InstanceInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _group(target: Target, autoscaling=None) -> dict[str, Any] | None:
    autoscaling = autoscaling or target.client("autoscaling")
    with aws_errors(f"describing auto scaling group {target.asg_name}"):
        groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[target.asg_name])
    found = groups.get("AutoScalingGroups", [])
    return found[0] if found else None


def _require_group(target: Target, autoscaling=None) -> dict[str, Any]:
    group = _group(target, autoscaling)
    if group is None:
        raise AwsError(
            f"auto scaling group {target.asg_name} not found in {check_region(target.region, target.profile)} "
            "(check --project/--env/--region, or deploy the stack first)"
        )
    return group


def _tag(instance: dict[str, Any], key: str) -> str | None:
    for tag in instance.get("Tags", []):
        if tag.get("Key") == key:
            return tag.get("Value")
    return None


def _instance_info(raw: dict[str, Any], now: dt.datetime) -> InstanceInfo:
    launched = raw.get("LaunchTime") or now
    step = _tag(raw, "Step")
    return InstanceInfo(
        id=raw["InstanceId"],
        type=raw.get("InstanceType") or "?",
        lifecycle="spot" if raw.get("InstanceLifecycle") == "spot" else "on-demand",
        availability_zone=raw.get("Placement", {}).get("AvailabilityZone", "?"),
        private_ip=raw.get("PrivateIpAddress"),
        public_ip=raw.get("PublicIpAddress"),
        state=raw.get("State", {}).get("Name", "?"),
        launch_time=launched.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        uptime_s=max(0.0, (now - launched).total_seconds()),
        run=_tag(raw, "Run"),
        step=int(step) if step and step.isdigit() else None,
    )


def project_instances(target: Target, states: list[str] | None = None, ec2=None) -> list[dict[str, Any]]:
    """Raw EC2 descriptions of the instances tagged with this project and environment."""
    ec2 = ec2 or target.client("ec2")
    filters = [
        {"Name": "tag:Project", "Values": [target.project]},
        {"Name": "tag:Environment", "Values": [target.environment]},
        {"Name": "instance-state-name", "Values": states or LIVE_STATES},
    ]
    found: list[dict[str, Any]] = []
    with aws_errors("describing the project's EC2 instances"):
        for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page.get("Reservations", []):
                found.extend(reservation.get("Instances", []))
    return found


def _fill_progress(info: InstanceInfo, progress: dict[str, dict[str, Any]]) -> None:
    """Run and step from a run's records, keyed by the host name the trainer saw: EC2's
    `ip-10-0-1-5` (IP-based names) or the instance id (resource-based names)."""
    hosts = [info.id] + ([f"ip-{info.private_ip.replace('.', '-')}"] if info.private_ip else [])
    for host in hosts:
        if host in progress:
            info.run = info.run or progress[host].get("run")
            info.step = info.step if info.step is not None else progress[host].get("step")
            return


def status(target: Target, now: dt.datetime | None = None,
           progress: dict[str, dict[str, Any]] | None = None) -> GroupInfo:
    """The group's capacity settings and every live instance of the project.

    `progress` (host name -> {"run", "step"}, from a run's records) fills run and step where
    the instance has no Run/Step tags.
    """
    now = now or dt.datetime.now(dt.timezone.utc)
    group = _require_group(target)
    instances = [_instance_info(raw, now) for raw in project_instances(target)]
    for info in instances:
        _fill_progress(info, progress or {})
    instances.sort(key=lambda i: (i.launch_time, i.id))
    return GroupInfo(target.asg_name, group["DesiredCapacity"], group["MinSize"], group["MaxSize"], instances)


def scale(target: Target, desired: int) -> tuple[int, int]:
    """Set the group's desired capacity; returns (before, after). Checked against min/max here,
    because not every endpoint enforces the bounds (moto does not)."""
    autoscaling = target.client("autoscaling")
    group = _require_group(target, autoscaling)
    low, high = group["MinSize"], group["MaxSize"]
    if not low <= desired <= high:
        raise UsageError(
            f"cannot scale {target.asg_name} to {desired}: allowed {low}..{high} "
            "(change min_size/max_size in terraform.tfvars and redeploy)"
        )
    with aws_errors(f"setting desired capacity of {target.asg_name}"):
        autoscaling.set_desired_capacity(AutoScalingGroupName=target.asg_name, DesiredCapacity=desired,
                                         HonorCooldown=False)
    return group["DesiredCapacity"], desired


@dataclass
class StopResult:
    group: str
    group_found: bool
    desired_before: int | None
    terminated: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stop(target: Target) -> StopResult:
    """Emergency stop: min and desired to 0 (so nothing is replaced), then terminate every live
    instance tagged with the project and environment, in or out of the group."""
    autoscaling = target.client("autoscaling")
    group = _group(target, autoscaling)
    if group is not None:
        with aws_errors(f"scaling {target.asg_name} to 0"):
            autoscaling.update_auto_scaling_group(AutoScalingGroupName=target.asg_name, MinSize=0,
                                                  DesiredCapacity=0)
    ec2 = target.client("ec2")
    ids = [raw["InstanceId"] for raw in project_instances(target, ["pending", "running", "stopping", "stopped"], ec2)]
    if ids:
        with aws_errors(f"terminating instances {', '.join(ids)}"):
            for start in range(0, len(ids), 500):  # TerminateInstances takes at most 1000 ids
                ec2.terminate_instances(InstanceIds=ids[start:start + 500])
    return StopResult(target.asg_name, group is not None, group["DesiredCapacity"] if group else None, ids)


# --------------------------------------------------------------------------- the jobs fleet
# Calls the agent (on an instance) and the reconciler make. They name the group directly: an
# agent learns its group from its own instance id, the reconciler is told it.
@dataclass(frozen=True)
class Capacity:
    name: str
    desired: int
    min: int
    max: int


@dataclass(frozen=True)
class ScheduledAction:
    """An `aws_autoscaling_schedule` as AWS describes it; -1 (or None) = "leave this field alone"."""

    name: str
    recurrence: str | None
    min: int | None
    max: int | None
    desired: int | None


@contextmanager
def _calling(action: str) -> Iterator[None]:
    """`aws_errors`, and a response botocore cannot parse (an endpoint's HTML error page) too."""
    from botocore.parsers import ResponseParserError

    try:
        with aws_errors(action):
            yield
    except ResponseParserError as error:
        raise AwsError(f"{action}: unreadable answer from AWS ({str(error).splitlines()[0][:120]})") from None


def capacity(group_name: str, region: str | None = None) -> Capacity:
    autoscaling = client("autoscaling", region=region)
    with _calling(f"describing auto scaling group {group_name}"):
        found = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group_name])["AutoScalingGroups"]
    if not found:
        raise AwsError(f"auto scaling group {group_name} not found (check --group or MAMBA_ASG_NAME)")
    g = found[0]
    return Capacity(group_name, g["DesiredCapacity"], g["MinSize"], g["MaxSize"])


def scheduled_actions(group_name: str, region: str | None = None) -> list[ScheduledAction]:
    autoscaling = client("autoscaling", region=region)
    with _calling(f"describing scheduled actions of {group_name}"):
        raw = autoscaling.describe_scheduled_actions(AutoScalingGroupName=group_name).get("ScheduledUpdateGroupActions", [])

    def field_value(item: dict[str, Any], key: str) -> int | None:
        value = item.get(key)
        return None if value is None or int(value) < 0 else int(value)

    return [ScheduledAction(a["ScheduledActionName"], a.get("Recurrence"), field_value(a, "MinSize"),
                            field_value(a, "MaxSize"), field_value(a, "DesiredCapacity")) for a in raw]


def set_desired(group_name: str, desired: int, region: str | None = None) -> None:
    autoscaling = client("autoscaling", region=region)
    with _calling(f"setting desired capacity of {group_name} to {desired}"):
        autoscaling.set_desired_capacity(AutoScalingGroupName=group_name, DesiredCapacity=desired, HonorCooldown=False)


def group_of_instance(instance_id: str, region: str | None = None) -> str | None:
    """The auto scaling group an instance belongs to, or None when it is in none."""
    autoscaling = client("autoscaling", region=region)
    with _calling(f"describing instance {instance_id} in auto scaling"):
        found = autoscaling.describe_auto_scaling_instances(InstanceIds=[instance_id]).get("AutoScalingInstances", [])
    return found[0]["AutoScalingGroupName"] if found else None


def set_protection(group_name: str, instance_id: str, protected: bool, region: str | None = None) -> None:
    """Scale-in protection: a busy instance is not picked when desired capacity drops (it does not
    protect against a spot interruption)."""
    autoscaling = client("autoscaling", region=region)
    with _calling(f"{'setting' if protected else 'clearing'} scale-in protection of {instance_id}"):
        autoscaling.set_instance_protection(AutoScalingGroupName=group_name, InstanceIds=[instance_id],
                                            ProtectedFromScaleIn=protected)


def leave_group(instance_id: str, region: str | None = None) -> None:
    """Terminate this instance and lower desired capacity by one, so the group is not refilled."""
    autoscaling = client("autoscaling", region=region)
    with _calling(f"terminating {instance_id} in its auto scaling group"):
        autoscaling.terminate_instance_in_auto_scaling_group(InstanceId=instance_id,
                                                             ShouldDecrementDesiredCapacity=True)


def complete_termination(group_name: str, instance_id: str, region: str | None = None) -> list[str]:
    """CONTINUE every termination lifecycle hook of the group for this instance; returns the hooks."""
    autoscaling = client("autoscaling", region=region)
    with _calling(f"describing lifecycle hooks of {group_name}"):
        hooks = autoscaling.describe_lifecycle_hooks(AutoScalingGroupName=group_name).get("LifecycleHooks", [])
    names = [h["LifecycleHookName"] for h in hooks
             if h.get("LifecycleTransition") == "autoscaling:EC2_INSTANCE_TERMINATING"]
    for name in names:
        with _calling(f"completing lifecycle action {name} for {instance_id}"):
            autoscaling.complete_lifecycle_action(AutoScalingGroupName=group_name, LifecycleHookName=name,
                                                  InstanceId=instance_id, LifecycleActionResult="CONTINUE")
    return names
