"""The rehearsal's loop: set the world up, submit the jobs, disrupt on schedule, watch, tear down.

Order of events: every input is checked before anything starts (bad input starts nothing); a fresh
folder and a fresh moto server; the Terraform stack applied to it while the jobs are trained
straight (without interruptions, locally) for the bitwise comparison; the reconciler (and, for
multi-node jobs, the coordinator) as processes; the jobs submitted; then ticks: the fleet follows
the group, due disruptions hit busy instances (whose trainers wait at a hold after each checkpoint
step until the tick has counted it: holds.py), progress and dollars are noted, until every job
has ended and the fleet is back to zero. Whatever happens (an error, Ctrl-C), every process it
started is ended by its process group before `rehearse` returns.
"""

from __future__ import annotations

import logging
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mamba_training.aws.prices import PriceTable
from mamba_training.aws.session import client
from mamba_training.checkpoint.protocol import read_latest
from mamba_training.checkpoint.store import open_store
from mamba_training.config import load_config
from mamba_training.errors import MambaTrainingError, UsageError
from mamba_training.fleet.launch import check_batch_fits
from mamba_training.fleet.nodes import NodeRange
from mamba_training.fleet.rehearsal import holds, moto, report
from mamba_training.fleet.rehearsal.fleet import SimulatedFleet
from mamba_training.fleet.rehearsal.prices import Market, costs, walk
from mamba_training.fleet.rehearsal.procs import Child, Processes, RehearsalError, free_port
from mamba_training.fleet.rehearsal.schedule import Event, choose, notice_seconds, plan
from mamba_training.fleet.rehearsal.stack import Outputs, Stack, find_terraform, resources_up

log = logging.getLogger(__name__)

REPO_CONFIG = Path(__file__).resolve().parents[4] / "configs" / "tiny.yaml"
# The generated jobs: the tiny model, small enough that a rehearsal takes minutes on two CPU cores.
# Its global batch is BATCH_PER_NODE per node, so it splits over any --nodes-per-job and each rank
# of a multi-node job does a single-node job's work.
BATCH_PER_NODE = 4
TINY_JOB = [
    "model.d_model=32", "model.n_layer=2", "train.seq_len=32", "train.warmup_steps=2",
    "train.eval_every=20", "train.eval_batches=2", "train.sample_tokens=0", "train.threads=1",
    "checkpoint.every_steps=10",
]
# Every job, generated or submitted: records one line per step (lost steps are counted from them),
# watches its IMDS often (the notice window is compressed), and sends nothing to CloudWatch.
ALWAYS = ["train.log_every=1", "spot.poll_seconds=0.2", "logging.cloudwatch=off", "logging.tensorboard=false",
          "logging.plot=false"]
# How long a trainer may wait at a hold for its checkpoint before it is released anyway (holds.py).
HOLD_PATIENCE = 120.0
AGENT_FLAGS = ["--exit-when-idle", "--idle-seconds", "3", "--lease-seconds", "9", "--wait-seconds", "1"]


@dataclass
class Options:
    instances: int = 2
    jobs: int = 2
    submit: tuple[Path, ...] = ()
    nodes_per_job: int = 1
    interrupt_every: float | None = None
    interruptions: int | None = None  # None with no interrupt_every: 2
    hard_kills: int = 0
    seed: int = 0
    notice_compression: float = 8.0
    steps: int = 60  # of each generated job
    directory: Path | None = None
    moto_port: int = 0
    timeout: float = 1800.0
    straight: bool = True
    instance_type: str = "g4dn.xlarge"
    tick_seconds: float = 0.25


@dataclass
class JobPlan:
    name: str
    config: Path
    overrides: list[str]
    max_steps: int
    every_steps: int = 0  # its checkpoint.every_steps: where its trainers hold
    id: str = ""
    store: str = ""
    straight_store: Path | None = None


@dataclass
class Snapshot:
    """What the live view shows, handed to `on_update` on every tick."""

    phase: str
    elapsed: float
    directory: Path
    instances: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    disruptions: dict[str, int] = field(default_factory=dict)
    cost_spot_usd: float = 0.0
    cost_on_demand_usd: float = 0.0
    spot_price: float | None = None


class Interrupted(MambaTrainingError):
    """Ctrl-C (or SIGTERM) stopped the rehearsal; every process it started has been ended."""

    exit_code = 130


# ---------------------------------------------------------------------- checking the input
def job_plans(options: Options, data_dir: Path) -> list[JobPlan]:
    """The jobs to submit, each config validated (a ConfigError names the file and key), for a
    multi-node rehearsal also its batch against the node count (one process per node here)."""
    common = [f"data.cache_dir={data_dir}", *ALWAYS]
    nodes = NodeRange(options.nodes_per_job, options.nodes_per_job)
    if options.submit:
        plans = []
        for i, path in enumerate(options.submit):
            overrides = list(common)
            config = load_config(path, overrides)
            check_batch_fits(config, nodes, 1)
            plans.append(JobPlan(f"{Path(path).stem}-{i}", Path(path), overrides, config.train.max_steps,
                                 config.checkpoint.every_steps))
        return plans
    plans = []
    for i in range(options.jobs):
        overrides = [*TINY_JOB, f"train.batch_size={BATCH_PER_NODE * options.nodes_per_job}",
                     f"train.max_steps={options.steps}", f"train.seed={options.seed + i}", *common]
        config = load_config(REPO_CONFIG, overrides)
        plans.append(JobPlan(f"tiny-{i}", REPO_CONFIG, overrides, options.steps, config.checkpoint.every_steps))
    return plans


def check(options: Options) -> list[Event]:
    """Every flag checked before anything starts; the plan of disruptions."""
    if options.instances < 1:
        raise UsageError(f"--instances {options.instances}: a rehearsal needs at least one instance")
    if not options.submit and options.jobs < 1:
        raise UsageError(f"--jobs {options.jobs}: submit at least one job")
    if options.submit and options.jobs != Options.jobs:
        raise UsageError("--jobs and --submit exclude each other: give one")
    if options.nodes_per_job < 1 or options.nodes_per_job > options.instances:
        raise UsageError(f"--nodes-per-job {options.nodes_per_job}: must be within 1..--instances "
                         f"({options.instances})")
    if options.steps < 1:
        raise UsageError(f"--steps {options.steps}: must be >= 1")
    for path in options.submit:
        if not Path(path).is_file():
            raise UsageError(f"--submit {path}: no such config file")
    notice_seconds(options.notice_compression)
    count = options.interruptions
    if count is None and options.interrupt_every is None:
        count = 2
    moto.check_installed()
    find_terraform()
    from mamba_training.fleet.rehearsal.procs import require_port

    require_port(options.moto_port, "--moto-port")
    return plan(options.seed, interruptions=count, every_seconds=options.interrupt_every,
                hard_kills=options.hard_kills)


def on_demand_price(instance_type: str) -> float:
    row = PriceTable.load().on_demand(instance_type, moto.REGION)
    if row is None:
        raise UsageError(f"--instance-type {instance_type}: no on-demand price in the price table")
    return row.usd_per_hour


def new_directory(options: Options) -> Path:
    """Where this rehearsal's files go (not created yet): --dir if new or empty, else a fresh name."""
    if options.directory is not None:
        directory = Path(options.directory)
        if directory.exists() and any(directory.iterdir()):
            raise UsageError(f"--dir {directory}: exists and is not empty (every rehearsal starts fresh)")
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        directory = Path.cwd() / "rehearsals" / f"{stamp}-seed{options.seed}-{secrets.token_hex(2)}"
    return directory.resolve()


# ---------------------------------------------------------------------- the rehearsal
class Rehearsal:
    def __init__(self, options: Options, on_update: Callable[[Snapshot], None] | None = None) -> None:
        self.options = options
        self.on_update = on_update or (lambda snapshot: None)
        self.events = check(options)
        self.price = on_demand_price(options.instance_type)
        self.directory = new_directory(options)
        self.plans = job_plans(options, self.directory / "data")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.processes = Processes(self.directory / "procs")
        self.started = time.monotonic()
        self.market: Market = walk(self.price, options.seed, int(options.timeout / 5) + 2)
        self.fleet: SimulatedFleet | None = None
        self.phase = "starting"
        self.cost_series: list[tuple[float, float, float]] = []
        self.progress: dict[str, list[tuple[float, int]]] = {}
        self.busy_seconds = 0.0
        self.next_event = 0
        self._held_since: dict[holds.Hold, float] = {}
        self.terraform_seconds: float | None = None

    def clock(self) -> float:
        return time.monotonic() - self.started

    # ------------------------------------------------------------------ entry
    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: every process it started has ended; its files are in {self.directory}") \
                from None
        finally:
            self._teardown()

    def _run(self) -> dict[str, Any]:
        self._update("starting the moto server")
        _, url = moto.start(self.processes, self.options.moto_port)
        self.env = {**moto.aws_env(url), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with moto.pointed_at(url):
            straight = self._start_straight_runs()
            self._update("applying the Terraform stack to moto")
            stack, apply, outputs = self._apply(url)
            self._start_controllers(outputs)
            self._submit(outputs)
            self._watch(outputs, apply)
            self._finish_apply(stack, apply, outputs)
            self._update("waiting for the straight runs")
            while straight.is_alive():
                straight.join(1.0)
                if self.clock() > self.options.timeout:
                    raise RehearsalError(f"the straight runs did not finish within --timeout "
                                         f"{self.options.timeout:g} s (logs in {self.processes.directory})")
            return self._result(outputs)

    def _update(self, phase: str | None = None) -> None:
        if phase is not None:
            self.phase = phase
            log.info("rehearsal: %s", phase)
        snapshot = Snapshot(self.phase, self.clock(), self.directory)
        if self.fleet is not None:
            now = self.clock()
            for i in sorted(self.fleet.instances.values(), key=lambda i: i.launched):
                if i.ended is None or now - i.ended < 30:
                    snapshot.instances.append({"id": i.id, "state": i.state, "busy": i.protected,
                                               "up_s": round((i.ended or now) - i.launched, 1),
                                               "deadline_s": None if i.deadline is None else round(i.deadline - now, 1)})
            for d in self.fleet.state.disruptions:
                snapshot.disruptions[d.kind] = snapshot.disruptions.get(d.kind, 0) + 1
            snapshot.cost_spot_usd, snapshot.cost_on_demand_usd = costs(self.fleet.usages(), self.market, now)
            snapshot.spot_price = self.market.price_at(now)
        snapshot.jobs = getattr(self, "_job_rows", [])
        self.on_update(snapshot)

    # ------------------------------------------------------------------ setting up
    def _apply(self, url: str) -> tuple[Stack, Child, Outputs]:
        """Start the apply; return once the group, queue and bucket exist (the apply goes on)."""
        ec2 = client("ec2", region=moto.REGION)
        ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        stack = Stack(self.processes, self.directory, url)
        stack.prepare()
        apply = stack.start_apply(ami, self.options.instances, self.options.instance_type, moto.REGION)
        found = None
        while found is None:
            if not apply.alive():
                stack.finish(apply)  # raises with terraform's error when it failed
                found = resources_up(moto.REGION)
                if found is None:
                    raise RehearsalError(f"terraform apply finished but the stack's group, queue or bucket is "
                                         f"missing in moto (log {apply.log})")
                break
            found = resources_up(moto.REGION)
            if found is None:
                time.sleep(0.5)
        return stack, apply, found

    def _finish_apply(self, stack: Stack, apply: Child, used: Outputs) -> None:
        self._update("waiting for terraform apply to return")
        outputs = stack.finish(apply)
        self.terraform_seconds = round(stack.seconds, 1)
        if (outputs.bucket, outputs.asg_name, outputs.queue_url) != (used.bucket, used.asg_name, used.queue_url):
            raise RehearsalError(f"the stack's outputs ({outputs.bucket}, {outputs.asg_name}, {outputs.queue_url}) "
                                 f"are not what the rehearsal used ({used.bucket}, {used.asg_name}, {used.queue_url})")

    def _start_straight_runs(self) -> threading.Thread:
        """Each single-node job trained once without interruptions, one after the other, in the background."""
        def work() -> None:
            for job in self.plans:
                if self.options.nodes_per_job != 1 or not self.options.straight or self._stopping.is_set():
                    continue
                job.straight_store = self.directory / "straight" / job.name
                args = [sys.executable, "-m", "mamba_training", "train", "-c", str(job.config),
                        *[a for s in [*job.overrides, f"checkpoint.store={job.straight_store}",
                                      f"checkpoint.cache_dir={self.directory / 'straight' / 'cache' / job.name}",
                                      "spot.imds_url=off"] for a in ("--set", s)], "--quiet"]
                child = self.processes.start(f"straight-{job.name}", args, self.env)
                child.proc.wait()

        self._stopping = threading.Event()
        thread = threading.Thread(target=work, name="straight-runs", daemon=True)
        thread.start()
        return thread

    def _start_controllers(self, outputs: Outputs) -> None:
        self.env.update(MAMBA_QUEUE_URL=outputs.queue_url, MAMBA_JOBS_STORE=outputs.jobs_store,
                        MAMBA_ASG_NAME=outputs.asg_name)
        if self.options.nodes_per_job > 1:
            port = free_port()
            self.processes.start("coordinator", [sys.executable, "-m", "mamba_training", "coordinator",
                                                 "--host", "127.0.0.1", "--port", str(port)], self.env)
            self.env["MAMBA_COORDINATOR"] = f"127.0.0.1:{port}"
        self.reconciler = self.processes.start(
            "reconciler", [sys.executable, "-m", "mamba_training", "reconcile", "--group", outputs.asg_name,
                           "--interval", "1", "--requeue-after", "30"], self.env)
        command = [sys.executable, "-m", "mamba_training", "agent", "--imds-url", "{imds}", *AGENT_FLAGS,
                   "--workdir", "{dir}/agent"]
        self.fleet = SimulatedFleet(self.processes, self.directory / "fleet", outputs.asg_name, command, self.env,
                                    notice_seconds(self.options.notice_compression), self.clock, moto.REGION,
                                    holds.hold_steps([(j.every_steps, j.max_steps) for j in self.plans]))

    def _submit(self, outputs: Outputs) -> None:
        from mamba_training.fleet.operations import Endpoints, submit

        where = Endpoints(outputs.queue_url, outputs.jobs_store)
        for job in self.plans:
            state = submit(where, job.config, job.overrides, nodes=self.options.nodes_per_job, name=job.name,
                           max_attempts=3)
            job.id = state.id
            job.store = f"{outputs.jobs_store}/{state.id}/run"
            self.progress[job.id] = [(self.clock(), 0)]
        self._update(f"{len(self.plans)} jobs submitted")

    # ------------------------------------------------------------------ the loop
    def _watch(self, outputs: Outputs, apply: Child) -> None:
        from mamba_training.fleet.jobs import JobsStore
        from mamba_training.fleet.operations import Endpoints, list_jobs

        where = Endpoints(outputs.queue_url, outputs.jobs_store)
        self.jobs_store = JobsStore(outputs.jobs_store)
        self.phase = "running the jobs"
        last = self.clock()
        while True:
            if not apply.alive() and apply.proc.returncode != 0:
                raise RehearsalError(f"terraform apply exited {apply.proc.returncode} (log {apply.log})")
            if not self.reconciler.alive():
                raise RehearsalError(f"the reconciler exited {self.reconciler.proc.returncode} "
                                     f"(log {self.reconciler.log})")
            self.fleet.sync()
            states = {s.id: s for s in list_jobs(where)}
            steps = {job.id: self._committed(job) for job in self.plans}
            now = self.clock()
            if any(s.state == "running" for s in states.values()):
                self.busy_seconds += now - last
            last = now
            for job in self.plans:
                if steps[job.id] is not None and steps[job.id] != self.progress[job.id][-1][1]:
                    self.progress[job.id].append((round(now, 3), steps[job.id]))
            self._fire_due(holds.progress(steps, {j.id: j.max_steps for j in self.plans}))
            self._release_holds(steps)
            self._job_rows = [{"name": j.name, "state": states[j.id].state if j.id in states else "?",
                               "step": steps[j.id] or 0, "max_steps": j.max_steps,
                               "attempts": states[j.id].attempts if j.id in states else 0,
                               "preemptions": states[j.id].preemptions if j.id in states else 0}
                              for j in self.plans]
            if not self.cost_series or now - self.cost_series[-1][0] >= 1.0:
                spot, on_demand = costs(self.fleet.usages(), self.market, now)
                self.cost_series.append((round(now, 2), round(spot, 6), round(on_demand, 6)))
            self._update()
            finished = all(s.state in ("done", "failed", "cancelled") for s in states.values())
            if finished and len(states) == len(self.plans) and not self.fleet.live() \
                    and self.fleet.state.capacity_history[-1] == 0:
                return
            if now > self.options.timeout:
                raise RehearsalError(f"the rehearsal did not finish within --timeout {self.options.timeout:g} s "
                                     f"(files in {self.directory})")
            time.sleep(self.options.tick_seconds)

    def _release_holds(self, committed: dict[str, int | None]) -> None:
        held = self.fleet.holds()
        if not held:
            return
        now = self.clock()
        for hold in held:
            self._held_since.setdefault(hold, now)
        job_of = self._job_of_instances()
        if job_of is None:  # a lease read failed: the holds wait for the next tick
            return
        due = set(holds.releasable(held, job_of, self.fleet.noticed(), committed))
        for hold in held:
            # A liveness guard, not a schedule: a hold whose checkpoint never shows up (a failed
            # save) must not stall the rehearsal until --timeout.
            if hold not in due and now - self._held_since[hold] > HOLD_PATIENCE and hold.instance \
                    not in self.fleet.noticed():
                log.warning("rehearsal: %s held at step %d for %.0f s without its checkpoint; released",
                            hold.instance, hold.step, now - self._held_since[hold])
                due.add(hold)
        for hold in due:
            self.fleet.release(hold)

    def _job_of_instances(self) -> dict[str, str | None] | None:
        """Which job each instance runs now, from the node slots' leases (holder `<instance>/<pid>`);
        None when a lease could not be read."""
        now, found = time.time(), {}
        for job in self.plans:
            for slot in range(self.options.nodes_per_job):
                try:
                    lease, _ = self.jobs_store.lease(job.id, slot)
                except MambaTrainingError as error:
                    log.warning("rehearsal: reading job %s's lease failed (%s); holds wait a tick", job.id, error)
                    return None
                if lease is not None and not lease.free(now):
                    found[lease.holder.split("/", 1)[0]] = job.id
        return found

    def _committed(self, job: JobPlan) -> int | None:
        try:
            pointer = read_latest(open_store(job.store))
        except MambaTrainingError:
            return None
        return pointer["step"] if pointer else None

    def _fire_due(self, progress: float) -> None:
        while self.next_event < len(self.events):
            event = self.events[self.next_event]
            if not event.due(progress, self.busy_seconds):
                return
            target = choose(event.pick, self.fleet.busy())
            if target is None:
                return  # nobody is training right now: the event waits for a busy instance
            log.info("rehearsal: %s to %s (event %d)", event.kind, target, event.index)
            self.fleet.disrupt(target, event.kind, event.index, event.rebalance_first)
            self.next_event += 1

    # ------------------------------------------------------------------ the end
    def _result(self, outputs: Outputs) -> dict[str, Any]:
        from mamba_training.fleet.operations import Endpoints, list_jobs

        states = {s.id: s for s in list_jobs(Endpoints(outputs.queue_url, outputs.jobs_store))}
        jobs = []
        for job in self.plans:
            state = states[job.id]
            run_dirs = list((self.directory / "fleet").glob(f"*/agent/{job.id}"))
            segments = report.read_segments(run_dirs)
            lost, lost_noticed = report.lost_steps(segments)
            entry = report.JobReport(
                id=job.id, name=job.name, state=state.state, nodes=state.nodes, attempts=state.attempts,
                preemptions=state.preemptions, final_step=self._committed(job), max_steps=job.max_steps,
                store=job.store, trained_steps=sum(len(s.steps) for s in segments), lost_steps=lost,
                lost_steps_after_notice=lost_noticed, progress=self.progress[job.id])
            entry.identical_to_straight, entry.not_compared = self._identical(job, state.state)
            jobs.append(entry)
        fleet = self.fleet.state
        disruptions = [{"at": round(d.at, 3), "kind": d.kind, "instance": d.instance_id, "event": d.index}
                       for d in fleet.disruptions]
        now = self.clock()
        extra = {"seed": self.options.seed, "directory": str(self.directory), "instances_max": self.options.instances,
                 "nodes_per_job": self.options.nodes_per_job, "instance_type": self.options.instance_type,
                 "on_demand_usd_per_hour": self.price,
                 "notice_seconds": notice_seconds(self.options.notice_compression),
                 "instances_launched": len(self.fleet.instances),
                 "instance_seconds": round(sum((u.end or now) - u.start for u in self.fleet.usages()), 1),
                 "wall_seconds": round(now, 1), "terraform_apply_seconds": self.terraform_seconds,
                 "cost_series": [list(c) for c in self.cost_series]}
        return report.summary(jobs, disruptions, fleet.capacity_history, fleet.capacity_timeline,
                              costs(self.fleet.usages(), self.market, now), extra)

    def _identical(self, job: JobPlan, state: str) -> tuple[bool | None, str | None]:
        """Whether the job's final weights are bitwise the straight run's; None with the reason
        when they were not compared."""
        if self.options.nodes_per_job > 1:
            return None, report.MULTI_NODE_NOT_COMPARED
        if job.straight_store is None:
            return None, "no straight run (--no-straight)"
        if state != "done":
            return None, f"the job ended {state}"
        straight = job.straight_store / "final" / "model.safetensors"
        if not straight.is_file():
            return None, f"the straight run left no final weights (log {self.processes.directory})"
        try:
            rehearsed = open_store(job.store).get_bytes("final/model.safetensors")
        except MambaTrainingError as error:
            return False, f"the job's final weights could not be read: {error}"
        return report.same_weights(straight.read_bytes(), rehearsed), None

    def _teardown(self) -> None:
        if hasattr(self, "_stopping"):
            self._stopping.set()
        if self.fleet is not None:
            self.fleet.stop()
        self.processes.stop_all()
        left = [c.name for c in self.processes.children if c.anything_alive()]
        if left:  # pragma: no cover - stop_all SIGKILLs every group and tag it created
            log.error("still running after the teardown: %s", ", ".join(left))


def rehearse(options: Options, on_update: Callable[[Snapshot], None] | None = None) -> dict[str, Any]:
    """Run one rehearsal; the `--json` document (also written to result.json, with the PNG beside it)."""
    rehearsal = Rehearsal(options, on_update)
    result = rehearsal.run()
    import json

    png = report.plot(result, rehearsal.directory / "rehearsal.png")
    result["png"] = str(png)
    (rehearsal.directory / "result.json").write_text(json.dumps(result, indent=2))
    return result


__all__ = ["Options", "Snapshot", "Rehearsal", "rehearse", "check", "Interrupted"]
