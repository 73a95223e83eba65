"""Job commands: `submit`, `jobs list|show|cancel|logs`, `agent` and `reconcile`.

The queue URL and the jobs store come from --queue/--store or MAMBA_QUEUE_URL/MAMBA_JOBS_STORE,
which the Terraform stack writes on every instance (docs/jobs.md).
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mamba_training.cli.fleet import JsonOpt, console, print_json

QueueOpt = typer.Option(None, "--queue", envvar="MAMBA_QUEUE_URL", help="SQS queue URL (MAMBA_QUEUE_URL).")
StoreOpt = typer.Option(None, "--store", envvar="MAMBA_JOBS_STORE",
                        help="Jobs store, e.g. s3://bucket/jobs (MAMBA_JOBS_STORE).")

app = typer.Typer(help="List, inspect, cancel and read the logs of submitted jobs.", no_args_is_help=True)


def register(root: typer.Typer) -> None:
    root.command("submit")(submit)
    root.command("agent")(agent)
    root.command("reconcile")(reconcile)
    root.add_typer(app, name="jobs")


def _endpoints(queue: Optional[str], store: Optional[str]):
    from mamba_training.fleet.operations import Endpoints

    return Endpoints(queue or None, store or None)


def _when(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if seconds else "-"


def submit(
    config: Path = typer.Argument(..., help="YAML run config."),
    overrides: list[str] = typer.Option([], "--set", "-s", help="Override a key: section.key=value (repeatable)."),
    nodes: int = typer.Option(1, "--nodes", help="Instances the job runs on at once."),
    name: Optional[str] = typer.Option(None, "--name", help="A label (default: the config file's name)."),
    priority: int = typer.Option(0, "--priority", help="Higher runs first."),
    max_attempts: int = typer.Option(3, "--max-attempts", help="Failed runs (not preemptions) before it fails."),
    queue: Optional[str] = QueueOpt, store: Optional[str] = StoreOpt, as_json: bool = JsonOpt,
) -> None:
    """Validate a run config and queue it as a job; prints the job id."""
    from mamba_training.fleet import operations

    job = operations.submit(_endpoints(queue, store), config, overrides, nodes=nodes, name=name, priority=priority,
                            max_attempts=max_attempts)
    if as_json:
        print_json(job.to_dict())
    else:
        typer.echo(job.id)


@app.command("list")
def list_jobs(queue: Optional[str] = QueueOpt, store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Every job in the jobs store, oldest first."""
    from mamba_training.fleet import operations

    jobs = operations.list_jobs(_endpoints(queue, store))
    if as_json:
        print_json([j.to_dict() for j in jobs])
        return
    if not jobs:
        console().print("no jobs")
        return
    table = Table("id", "name", "state", "nodes", "priority", "attempts", "step", "holder", "submitted")
    for j in jobs:
        table.add_row(j.id, j.name, j.state + (" (cancelling)" if j.cancel_requested and j.state == "running" else ""),
                      str(j.nodes), str(j.priority), f"{j.attempts}/{j.max_attempts}",
                      "-" if j.step is None else str(j.step), j.holder or "-", _when(j.submitted_at))
    console().print(table)


@app.command("show")
def show(job_id: str = typer.Argument(..., help="Job id."), queue: Optional[str] = QueueOpt,
         store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """One job's state and spec."""
    from mamba_training.fleet import operations

    state, spec = operations.show(_endpoints(queue, store), job_id)
    if as_json:
        print_json({**state.to_dict(), "run_store": spec.run_store, "config": spec.config})
        return
    out = console()
    for key, value in state.to_dict().items():
        shown = _when(value) if key.endswith("_at") else value
        out.print(f"{key:>16}  {shown}", markup=False, highlight=False)
    out.print(f"{'run_store':>16}  {spec.run_store}", markup=False, highlight=False)


@app.command("cancel")
def cancel(job_id: str = typer.Argument(..., help="Job id."), queue: Optional[str] = QueueOpt,
           store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """Cancel a job: a queued one at once, a running one after its checkpoint."""
    from mamba_training.fleet import operations

    job = operations.cancel(_endpoints(queue, store), job_id)
    if as_json:
        print_json(job.to_dict())
    elif job.state == "cancelled":
        typer.echo(f"{job.id}: cancelled")
    else:
        typer.echo(f"{job.id}: cancel requested; its agent stops the run with a checkpoint")


@app.command("logs")
def logs(job_id: str = typer.Argument(..., help="Job id."), queue: Optional[str] = QueueOpt,
         store: Optional[str] = StoreOpt, as_json: bool = JsonOpt) -> None:
    """The output of each finished run of a job, oldest first."""
    from mamba_training.fleet import operations

    found = operations.logs(_endpoints(queue, store), job_id)
    if as_json:
        print_json([{"run": name, "text": data.decode(errors="replace")} for name, data in found])
        return
    for name, data in found:
        typer.echo(f"==> {name} <==")
        typer.echo(data.decode(errors="replace").rstrip("\n"))


def agent(
    exit_when_idle: bool = typer.Option(False, "--exit-when-idle", help="Exit when idle, even outside a group."),
    imds_url: str = typer.Option("auto", "--imds-url", help="auto (on EC2 only), off, or a metadata URL."),
    idle_seconds: float = typer.Option(600.0, "--idle-seconds", min=0, help="Idle time before leaving."),
    lease_seconds: float = typer.Option(300.0, "--lease-seconds", min=1, help="A job's lease; renewed every third."),
    wait_seconds: int = typer.Option(20, "--wait-seconds", min=0, max=20, help="SQS long-poll wait."),
    workdir: Path = typer.Option(Path(".mamba-agent"), "--workdir", help="Local folder for runs' files."),
    coordinator: Optional[str] = typer.Option(None, "--coordinator", envvar="MAMBA_COORDINATOR",
                                              help="HOST:PORT for multi-node jobs."),
    nproc_per_node: Optional[int] = typer.Option(None, "--nproc-per-node", min=1,
                                                 help="Trainer processes per node (default: one per GPU, else 1)."),
    queue: Optional[str] = QueueOpt, store: Optional[str] = StoreOpt,
) -> None:
    """Run jobs from the queue on this machine, one at a time (the instance's systemd service)."""
    from mamba_training.config import SpotConfig
    from mamba_training.errors import ConfigError
    from mamba_training.fleet.agent import AgentOptions, run_agent
    from mamba_training.logging_setup import setup_logging

    try:
        SpotConfig(imds_url=imds_url)
    except ValueError:
        raise ConfigError(f"--imds-url {imds_url!r}: must be 'auto', 'off' or an http(s):// URL") from None
    where = _endpoints(queue, store)
    where.jobs(), where.queue()  # one-line usage errors for a missing queue or store
    setup_logging("info")
    why = run_agent(AgentOptions(queue_url=where.queue_url, store_url=where.store_url, imds_url=imds_url,
                                 workdir=workdir, lease_seconds=lease_seconds, idle_seconds=idle_seconds,
                                 exit_when_idle=exit_when_idle, wait_seconds=wait_seconds,
                                 coordinator=coordinator or None, nproc_per_node=nproc_per_node))
    typer.echo(f"agent: {why}", err=True)


def reconcile(
    once: bool = typer.Option(False, "--once", help="One pass, then exit."),
    group: Optional[str] = typer.Option(None, "--group", envvar="MAMBA_ASG_NAME", help="Auto scaling group name."),
    interval: float = typer.Option(30.0, "--interval", min=0.05, help="Seconds between passes."),
    requeue_after: float = typer.Option(900.0, "--requeue-after", min=0,
                                        help="Re-send the message of a job queued this long."),
    queue: Optional[str] = QueueOpt, store: Optional[str] = StoreOpt, as_json: bool = JsonOpt,
) -> None:
    """Set the group's desired capacity from the jobs' needs (and return jobs whose agent vanished)."""
    from mamba_training.errors import UsageError
    from mamba_training.fleet.reconcile import ReconcileOptions, reconcile_forever, reconcile_once
    from mamba_training.logging_setup import setup_logging

    if not group:
        raise UsageError("no auto scaling group: pass --group or set MAMBA_ASG_NAME")
    where = _endpoints(queue, store)
    where.jobs(), where.queue()
    options = ReconcileOptions(where.queue_url, where.store_url, group, interval, requeue_after)

    def show(result) -> None:
        if as_json:
            typer.echo(json.dumps(result.to_dict()))
        else:
            typer.echo(f"{group}: need {result.need} node(s); desired {result.desired_before} -> {result.desired}"
                       + (f"; returned {', '.join(result.returned)}" if result.returned else ""))

    if once:
        show(reconcile_once(options))
        return
    setup_logging("info")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    reconcile_forever(options, stop, show)
