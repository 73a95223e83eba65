"""Fleet commands: status, scale, stop, logs, prices, interruptions.

Each parses options, calls one library function (aws/, train/report.py) and renders the
result as a rich table or, with --json, as JSON for scripts.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from mamba_training.aws.fleet import Target

DEFAULT_PROJECT = "mamba-training"
DEFAULT_ENV = "dev"

# The options every AWS command shares; defaults may come from the environment.
RegionOpt = typer.Option(None, "--region", help="AWS region (default: AWS_REGION, your profile's, else us-east-1).")
ProfileOpt = typer.Option(None, "--profile", help="AWS profile (default: AWS_PROFILE).")
EnvOpt = typer.Option(DEFAULT_ENV, "--env", envvar="MAMBA_TRAINING_ENV", help="Deployment environment.")
ProjectOpt = typer.Option(DEFAULT_PROJECT, "--project", envvar="MAMBA_TRAINING_PROJECT", help="Project name.")
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")


def register(app: typer.Typer) -> None:
    """Add the fleet commands to the top-level app."""
    app.command("status")(status)
    # "-1" reaches the argument (and a one-line error) instead of click's "No such option: -1".
    app.command("scale", context_settings={"ignore_unknown_options": True})(scale)
    app.command("stop")(stop)
    app.command("logs")(logs)
    app.command("prices")(prices)
    app.command("interruptions")(interruptions)


def console() -> Console:
    """stdout; wide enough for our tables when it is not a terminal (pipes, tests)."""
    return Console() if sys.stdout.isatty() else Console(width=200, no_color=True)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def target(project: str, env: str, region: Optional[str], profile: Optional[str]) -> Target:
    return Target(project=project, environment=env, region=region or None, profile=profile or None)


def split_list(values: list[str] | None) -> list[str]:
    """`-t a,b -t c` -> [a, b, c]."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def human_duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def money(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"${value:,.{digits}f}"


def status(
    store: Optional[str] = typer.Option(None, "--store", help="A run's store: show which instance runs it, "
                                        "at which step (from its records)."),
    region: Optional[str] = RegionOpt, profile: Optional[str] = ProfileOpt, env: str = EnvOpt,
    project: str = ProjectOpt, as_json: bool = JsonOpt,
) -> None:
    """The auto scaling group's capacity and the project's instances."""
    from mamba_training.aws import fleet

    progress = None
    if store:
        from mamba_training.train import report

        progress = report.progress_by_host(report.load(store))
    info = fleet.status(target(project, env, region, profile), progress=progress)
    if as_json:
        print_json(info.to_dict())
        return
    out = console()
    out.print(f"[bold]{info.name}[/]  desired {info.desired}  min {info.min}  max {info.max}  "
              f"instances {len(info.instances)}")
    if not info.instances:
        out.print("no instances")
        return
    table = Table("instance", "type", "lifecycle", "AZ", "IP", "state", "uptime", "run", "step")
    for i in info.instances:
        table.add_row(i.id, i.type, i.lifecycle, i.availability_zone, i.public_ip or i.private_ip or "-", i.state,
                      human_duration(i.uptime_s), i.run or "-", "-" if i.step is None else str(i.step))
    out.print(table)


def scale(
    desired: int = typer.Argument(..., help="New desired capacity (within the group's min..max)."),
    region: Optional[str] = RegionOpt, profile: Optional[str] = ProfileOpt, env: str = EnvOpt,
    project: str = ProjectOpt, as_json: bool = JsonOpt,
) -> None:
    """Set the number of training instances."""
    from mamba_training.aws import fleet
    from mamba_training.errors import UsageError

    if desired < 0:
        raise UsageError(f"desired capacity {desired}: must be 0 or more (0 stops training, keeps the group)")
    where = target(project, env, region, profile)
    before, after = fleet.scale(where, desired)
    if as_json:
        print_json({"group": where.asg_name, "desired_before": before, "desired": after})
    else:
        console().print(f"{where.asg_name}: desired capacity {before} -> {after}")


def stop(
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    region: Optional[str] = RegionOpt, profile: Optional[str] = ProfileOpt, env: str = EnvOpt,
    project: str = ProjectOpt, as_json: bool = JsonOpt,
) -> None:
    """Emergency stop: scale the group to 0 and terminate every instance of the project."""
    from mamba_training.aws import fleet

    where = target(project, env, region, profile)
    if not yes:
        typer.confirm(f"Scale {where.asg_name} to 0 and terminate every instance tagged "
                      f"Project={where.project} Environment={where.environment}?", abort=True)
    result = fleet.stop(where)
    if as_json:
        print_json(result.to_dict())
        return
    out = console()
    if result.group_found:
        out.print(f"{result.group}: min and desired capacity set to 0 (was {result.desired_before})")
    else:
        out.print(f"{result.group}: not found; terminating tagged instances only")
    out.print(f"terminated {len(result.terminated)} instance(s)" +
              (f": {', '.join(result.terminated)}" if result.terminated else ""))


def _log_line(event: dict[str, Any]) -> str:
    when = dt.datetime.fromtimestamp(event["timestamp"] / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{when} {event.get('logStreamName', '-')} {event.get('message', '').rstrip()}"


def logs(
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep polling for new events (Ctrl-C stops)."),
    since: str = typer.Option("1h", "--since", help="Start: a duration ago (30m, 1h, 2d) or an ISO date/time."),
    pattern: Optional[str] = typer.Option(None, "--filter", help="CloudWatch Logs filter pattern."),
    limit: int = typer.Option(0, "--limit", min=0, help="Only the newest N events (0: all; not with --follow)."),
    poll_seconds: float = typer.Option(2.0, "--poll-seconds", min=0.05, help="Polling interval for --follow."),
    follow_for: Optional[float] = typer.Option(None, "--follow-for", min=0, help="Stop following after N seconds."),
    region: Optional[str] = RegionOpt, profile: Optional[str] = ProfileOpt, env: str = EnvOpt,
    project: str = ProjectOpt, as_json: bool = JsonOpt,
) -> None:
    """Training logs from CloudWatch Logs (/aws/ec2/<project>-<env>/training)."""
    from mamba_training.aws import logs as fleet_logs

    where = target(project, env, region, profile)
    start = fleet_logs.parse_since(since)

    def show(event: dict[str, Any]) -> None:
        if as_json:
            typer.echo(json.dumps({k: event.get(k) for k in ("timestamp", "logStreamName", "message", "eventId")}))
        else:
            typer.echo(_log_line(event))

    if not follow:
        events = fleet_logs.fetch(where, start, pattern, limit=limit or None)
        for event in events:
            show(event)
        if not events and not as_json:  # an empty screen would read as "broken"; say what was asked
            matching = f" matching {pattern!r}" if pattern else ""
            typer.echo(f"no log events{matching} in {where.log_group} since {start:%Y-%m-%d %H:%M:%SZ} "
                       "(try --since 1d)", err=True)
        return
    try:
        for event in fleet_logs.follow(where, start, pattern, poll_seconds, follow_for):
            show(event)
            sys.stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C is how one stops following: not an error
        return


def prices(
    instance_types: list[str] = typer.Option([], "--instance-types", "-t",
                                             help="Types to show (repeat or comma-separate); default: a GPU list."),
    region: Optional[str] = RegionOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt,
) -> None:
    """Current spot prices per AZ beside the on-demand price and the saving."""
    from mamba_training.aws.prices import (DEFAULT_INSTANCE_TYPES, US_EAST_1_FALLBACK, PriceTable,
                                           check_instance_types, latest_quotes, quote_table, spot_history)
    from mamba_training.aws.session import check_region

    types = check_instance_types(split_list(instance_types)) or DEFAULT_INSTANCE_TYPES
    resolved = check_region(region, profile)
    table = PriceTable.load()
    rows = quote_table(latest_quotes(spot_history(types, resolved, profile)), table, resolved)
    missing = sorted(set(types) - {r["instance_type"] for r in rows})
    borrowed = sorted({r["instance_type"] for r in rows if US_EAST_1_FALLBACK in (r["on_demand_source"] or "")})
    if as_json:
        print_json({"region": resolved, "prices": rows, "no_spot_offer": missing,
                    "on_demand_from_us_east_1": borrowed})
        return
    out = console()
    if not rows:
        out.print(f"no spot offer in {resolved} for: {', '.join(missing)}")
        return
    grid = Table("type", "AZ", "spot $/h", "as of", "on-demand $/h", "saving", title=f"spot prices in {resolved}")
    for r in rows:
        saving = "-" if r["saving_percent"] is None else f"{r['saving_percent']:.0f}%"
        grid.add_row(r["instance_type"], r["availability_zone"], money(r["spot_usd_per_hour"]),
                     r["spot_time"] + (" (stale)" if r["stale"] else ""), money(r["on_demand_usd_per_hour"]), saving)
    out.print(grid)
    if missing:
        out.print(f"no spot offer in {resolved} for: {', '.join(missing)}")
    if borrowed:
        out.print(f"on-demand: no {resolved} row in the price table for {', '.join(borrowed)}; "
                  "the us-east-1 price is shown (add rows to your price file for exact ones)")
    if any(r["stale"] for r in rows):
        out.print("stale: the newest price is over a year old (a placeholder, not a price)")


def interruptions(
    store: Optional[str] = typer.Option(None, "--store", help="The run's store (default: checkpoint.store of "
                                        "the config)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="Run config naming the store."),
    as_json: bool = JsonOpt,
) -> None:
    """Interruption notices, rebalance recommendations and preempted exits recorded by a run."""
    from mamba_training.train import report

    url = store or _configured_store(config)
    rows = report.interruptions(report.load(url))
    if as_json:
        print_json(rows)
        return
    out = console()
    if not rows:
        out.print(f"no interruptions recorded in {url}")
        return
    table = Table("time", "kind", "step", "segment", "detail", title=f"interruptions in {url}")
    for r in rows:
        detail = " ".join(f"{k}={v}" for k, v in r["detail"].items())
        table.add_row(str(r["time"]), str(r["kind"]), str(r["step"]), str(r["segment"]), detail)
    out.print(table)
    out.print(f"{len(rows)} event(s)")


def _configured_store(config: Optional[str]) -> str:
    from mamba_training.config import load_config

    return load_config(config).checkpoint.store
