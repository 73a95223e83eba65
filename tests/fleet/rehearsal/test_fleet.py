"""The simulated fleet against a real moto server, with a stand-in instance command.

The stand-in (standin.py) waits for a spot notice on its instance's IMDS and exits 75, as the
agent does; the tests drive the group's desired capacity in moto and check that processes follow
it, that a notice reaches the right instance and a reclaim brings a replacement, that a hard kill
ends the process tree at once, and that nothing is left running.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from aws.moto_fleet import ASG, make_fleet
from mamba_training.aws.session import client
from mamba_training.fleet.rehearsal.fleet import SimulatedFleet
from mamba_training.fleet.rehearsal.moto import aws_env
from mamba_training.fleet.rehearsal.procs import Processes, group_alive
from mamba_training.fleet.rehearsal.schedule import HARD_KILL, NOTICE

STANDIN = Path(__file__).with_name("standin.py")
NOTICE_SECONDS = 1.0


def sync_until(fleet: SimulatedFleet, condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        fleet.sync()
        if condition():
            return
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s; instances {fleet.instances}"
        time.sleep(0.05)


def group_gone(pid: int) -> bool:
    return not group_alive(pid)


@pytest.fixture
def fleet(rehearsal_aws: str, processes: Processes, tmp_path: Path) -> SimulatedFleet:
    make_fleet(desired=0, max_size=3)
    start = time.monotonic()
    return SimulatedFleet(processes, tmp_path / "fleet", ASG, [sys.executable, str(STANDIN), "{imds}"],
                          aws_env(rehearsal_aws), NOTICE_SECONDS, lambda: time.monotonic() - start, "us-east-1")


def started(fleet: SimulatedFleet) -> list[str]:
    return [i.id for i in fleet.live() if i.imds_url and (i.dir / "started").exists()]


def test_processes_follow_the_desired_capacity_and_a_notice_brings_a_replacement(fleet: SimulatedFleet) -> None:
    autoscaling = client("autoscaling")
    fleet.sync()
    assert fleet.live() == []
    autoscaling.set_desired_capacity(AutoScalingGroupName=ASG, DesiredCapacity=2)
    sync_until(fleet, lambda: len(started(fleet)) == 2, "two instances running their command")

    noticed = sorted(started(fleet))[0]
    fleet.disrupt(noticed, NOTICE, index=0, rebalance_first=True)
    instance = fleet.instances[noticed]
    sync_until(fleet, lambda: instance.exit_code() == 75, "the noticed instance's command exits 75")
    assert '"action": "terminate"' in (instance.dir / "notice.json").read_text()
    sync_until(fleet, lambda: instance.state == "reclaimed", "the reclaim at the compressed deadline")
    assert instance.ended - instance.launched > 0 and group_gone(instance.child.pid)
    sync_until(fleet, lambda: len(started(fleet)) == 2, "a replacement running its command")
    assert noticed not in [i.id for i in fleet.live()]
    assert [d.kind for d in fleet.state.disruptions] == ["rebalance", NOTICE]

    killed = sorted(started(fleet))[0]
    fleet.disrupt(killed, HARD_KILL, index=1)
    assert fleet.instances[killed].state == "killed" and group_gone(fleet.instances[killed].child.pid)
    sync_until(fleet, lambda: len(started(fleet)) == 2, "a replacement for the killed instance")

    autoscaling.set_desired_capacity(AutoScalingGroupName=ASG, DesiredCapacity=0)
    sync_until(fleet, lambda: fleet.live() == [], "the fleet back to zero")
    assert fleet.state.capacity_history == [0, 2, 0]
    assert all(group_gone(i.child.pid) for i in fleet.instances.values())
    assert len(fleet.instances) == 4  # two first, two replacements
    spans = fleet.usages()
    assert all(u.end is not None and u.end >= u.start for u in spans)


def test_an_instance_that_leaves_the_group_is_ended(fleet: SimulatedFleet) -> None:
    """The agent's own TerminateInstanceInAutoScalingGroup (decrement) takes its process away."""
    autoscaling = client("autoscaling")
    autoscaling.set_desired_capacity(AutoScalingGroupName=ASG, DesiredCapacity=1)
    sync_until(fleet, lambda: len(started(fleet)) == 1, "one instance running")
    (only,) = started(fleet)
    autoscaling.terminate_instance_in_auto_scaling_group(InstanceId=only, ShouldDecrementDesiredCapacity=True)
    sync_until(fleet, lambda: fleet.live() == [], "the instance's process ended")
    assert fleet.instances[only].state == "gone" and group_gone(fleet.instances[only].child.pid)
    assert fleet.state.capacity_history == [1, 0]
