"""The simulated fleet: the auto scaling group's instances in moto become local instance processes.

moto launches EC2 instances (tagged from the group) when the desired capacity rises and replaces
one that is terminated without decrementing it, but runs nothing. `sync` closes that gap on each
tick: an instance of the group with no process gets one (`instance.py`: its own IMDS emulator and
the instance command, normally the agent); a process whose instance left the group (scale-in, the
agent's own TerminateInstanceInAutoScalingGroup) is ended. Disruptions act on both sides: a
notice goes to the instance's IMDS and, when its compressed deadline passes, the instance is
reclaimed (process group ended, instance terminated in moto without decrementing the desired
capacity, as a spot reclaim does); a hard kill does both at once, with no notice.

With `hold_steps`, each instance's trainers hold after those steps (the trainer's hook, with the
instance's own control folder `<dir>/control`), and `holds` / `release` are the rehearsal's side
of it (holds.py says why).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mamba_training.aws.session import client
from mamba_training.fleet.rehearsal.prices import Usage
from mamba_training.fleet.rehearsal.holds import Hold
from mamba_training.fleet.rehearsal.procs import Child, Processes, RehearsalError
from mamba_training.fleet.rehearsal.schedule import HARD_KILL, NOTICE
from mamba_training.train.control import CONTROL_DIR, HOLD_AT, reached_path, release_path

READY_TIMEOUT = 60.0  # an instance process imports the emulator and starts serving: seconds when busy
RECLAIM_GRACE = 5.0  # SIGTERM-to-SIGKILL at a reclaim: the machine's shutdown, compressed too
LIVE_STATES = ("Pending", "Pending:Wait", "Pending:Proceed", "InService")


@dataclass
class Instance:
    id: str
    type: str
    child: Child
    dir: Path
    launched: float  # rehearsal seconds
    ended: float | None = None
    imds_url: str | None = None
    deadline: float | None = None  # reclaim time after a notice
    protected: bool = False
    state: str = "booting"  # booting, running, noticed, reclaimed, killed, gone

    def exit_code(self) -> int | None:
        try:
            return json.loads((self.dir / "exit.json").read_text())["code"]
        except (OSError, ValueError, KeyError):
            return None


@dataclass
class Disruption:
    at: float
    kind: str  # notice, rebalance, hard-kill
    instance_id: str
    index: int


@dataclass
class FleetState:
    """What the fleet saw: for the view, the report and the tests."""

    capacity_history: list[int] = field(default_factory=list)
    capacity_timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (t, desired, running)
    disruptions: list[Disruption] = field(default_factory=list)


class SimulatedFleet:
    def __init__(self, processes: Processes, directory: Path, asg_name: str, command: list[str],
                 env: dict[str, str], notice_seconds: float, clock, region: str,
                 hold_steps: tuple[int, ...] = ()) -> None:
        self.processes = processes
        self.directory = directory
        self.asg_name = asg_name
        self.command = command
        self.env = env
        self.notice_seconds = notice_seconds
        self.clock = clock  # () -> rehearsal seconds
        self.region = region
        self.hold_steps = hold_steps
        self.instances: dict[str, Instance] = {}
        self.state = FleetState()
        self.autoscaling = client("autoscaling", region=region)

    # ------------------------------------------------------------------ observing
    def group(self) -> dict[str, Any]:
        groups = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[self.asg_name])
        if not groups["AutoScalingGroups"]:
            raise RehearsalError(f"auto scaling group {self.asg_name} not found in moto")
        return groups["AutoScalingGroups"][0]

    def sync(self) -> None:
        """One tick: reclaim what is due, match processes to the group's instances, note the capacity."""
        now = self.clock()
        for instance in self.live():
            if instance.deadline is not None and now >= instance.deadline:
                self._reclaim(instance, "reclaimed")
        group = self.group()
        members = {i["InstanceId"]: i for i in group["Instances"] if i["LifecycleState"] in LIVE_STATES}
        for instance_id, member in members.items():
            known = self.instances.get(instance_id)
            if known is None:
                self._launch(instance_id, member.get("InstanceType") or "g4dn.xlarge")
            else:
                known.protected = bool(member.get("ProtectedFromScaleIn"))
        for instance in self.live():
            if instance.id not in members:  # scaled in, or the agent terminated its own instance
                instance.child.stop(timeout=RECLAIM_GRACE)
                self._end(instance, "gone")
            elif instance.state == "booting" and instance.imds_url is None:
                self._read_ready(instance)
        desired = int(group["DesiredCapacity"])
        if not self.state.capacity_history or self.state.capacity_history[-1] != desired:
            self.state.capacity_history.append(desired)
        running = len(self.live())
        timeline = self.state.capacity_timeline
        if not timeline or timeline[-1][1:] != (desired, running):
            timeline.append((round(now, 3), desired, running))

    def live(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.ended is None]

    def busy(self) -> list[str]:
        """Instances that protect themselves from scale-in (the agent's sign of a running job), not noticed yet."""
        return [i.id for i in self.live() if i.protected and i.deadline is None]

    def usages(self) -> list[Usage]:
        return [Usage(i.id, i.launched, i.ended) for i in self.instances.values()]

    def noticed(self) -> set[str]:
        return {i.id for i in self.live() if i.deadline is not None}

    # ------------------------------------------------------------------ holds
    def holds(self) -> list[Hold]:
        """Live instances' trainers waiting at a hold step (reached, not released)."""
        found = []
        for instance in self.live():
            for step in self.hold_steps:
                control = instance.dir / "control"
                if reached_path(control, step).exists() and not release_path(control, step).exists():
                    found.append(Hold(instance.id, step))
        return found

    def release(self, hold: Hold) -> None:
        release_path(self.instances[hold.instance].dir / "control", hold.step).touch()

    # ------------------------------------------------------------------ launching and ending
    def _launch(self, instance_id: str, instance_type: str) -> None:
        directory = self.directory / instance_id
        args = [sys.executable, "-m", "mamba_training.fleet.rehearsal.instance", "--instance-id", instance_id,
                "--instance-type", instance_type, "--notice-seconds", f"{self.notice_seconds:g}",
                "--dir", str(directory), "--", *self.command]
        env = dict(self.env)
        if self.hold_steps:
            (directory / "control").mkdir(parents=True, exist_ok=True)
            env.update({HOLD_AT: ",".join(map(str, self.hold_steps)), CONTROL_DIR: str(directory / "control")})
        child = self.processes.start(f"instance-{instance_id}", args, env)
        self.instances[instance_id] = Instance(instance_id, instance_type, child, directory, self.clock())

    def _read_ready(self, instance: Instance) -> None:
        try:
            instance.imds_url = json.loads((instance.dir / "ready.json").read_text())["imds_url"]
            instance.state = "running"
        except (OSError, ValueError, KeyError):
            if not instance.child.alive():
                raise RehearsalError(f"instance {instance.id} exited {instance.child.proc.returncode} at boot "
                                     f"(log {instance.child.log})") from None
            if self.clock() - instance.launched > READY_TIMEOUT:
                raise RehearsalError(f"instance {instance.id} did not boot within {READY_TIMEOUT:.0f} s "
                                     f"(log {instance.child.log})") from None

    def wait_ready(self, instance_id: str, timeout: float = READY_TIMEOUT) -> Instance:
        instance = self.instances[instance_id]
        deadline = time.monotonic() + timeout
        while instance.imds_url is None:
            self._read_ready(instance)
            if instance.imds_url is None:
                if time.monotonic() > deadline:
                    raise RehearsalError(f"instance {instance_id} did not boot within {timeout:.0f} s")
                time.sleep(0.05)
        return instance

    def _end(self, instance: Instance, state: str) -> None:
        instance.ended = self.clock()
        instance.state = state

    def _terminate_in_group(self, instance: Instance) -> None:
        # A spot reclaim does not lower the desired capacity: the group (moto, here) replaces the instance.
        try:
            self.autoscaling.terminate_instance_in_auto_scaling_group(
                InstanceId=instance.id, ShouldDecrementDesiredCapacity=False)
        except Exception as error:
            # Already out of the group (scaled in, or its agent left first; moto answers 500 then): done.
            found = self.autoscaling.describe_auto_scaling_instances(InstanceIds=[instance.id])
            if found["AutoScalingInstances"]:
                raise RehearsalError(f"could not terminate instance {instance.id} in moto: {error}") from None

    def _reclaim(self, instance: Instance, state: str) -> None:
        instance.child.stop(timeout=RECLAIM_GRACE)
        self._end(instance, state)
        self._terminate_in_group(instance)

    # ------------------------------------------------------------------ disruptions
    def _control(self, instance: Instance, path: str) -> None:
        if instance.imds_url is None:
            self.wait_ready(instance.id)
        request = urllib.request.Request(f"{instance.imds_url}/control/{path}", method="POST")
        urllib.request.urlopen(request, timeout=5).read()

    def disrupt(self, instance_id: str, kind: str, index: int, rebalance_first: bool = False) -> None:
        instance = self.instances[instance_id]
        now = self.clock()
        if kind == NOTICE:
            if rebalance_first:
                self._control(instance, "rebalance")
                self.state.disruptions.append(Disruption(now, "rebalance", instance_id, index))
            self._control(instance, "interrupt?action=terminate")
            instance.deadline = now + self.notice_seconds
            instance.state = "noticed"
        elif kind == HARD_KILL:
            instance.child.kill()
            self._end(instance, "killed")
            self._terminate_in_group(instance)
        else:
            raise ValueError(f"unknown disruption {kind!r}")
        self.state.disruptions.append(Disruption(now, kind, instance_id, index))

    def stop(self) -> None:
        now = self.clock()
        for instance in self.live():
            instance.child.stop(timeout=RECLAIM_GRACE)
            instance.ended = now
            instance.state = "gone"


__all__ = ["SimulatedFleet", "Instance", "Disruption", "FleetState"]
