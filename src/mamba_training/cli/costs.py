"""Cost commands: cost, advise, report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mamba_training.cli.fleet import ProfileOpt, ProjectOpt, RegionOpt, JsonOpt, console, money, print_json, split_list


def register(app: typer.Typer) -> None:
    """Add the cost commands to the top-level app."""
    app.command("cost")(cost)
    app.command("advise")(advise)
    app.command("report")(report)


def cost(
    run: Optional[str] = typer.Option(None, "--run", help="A run's store URL: use its cost ledgers."),
    since: Optional[str] = typer.Option(None, "--since", help="From this date (ISO, or a duration like 7d)."),
    no_cost_explorer: bool = typer.Option(False, "--no-cost-explorer", help="Use only the run's ledgers."),
    project: str = ProjectOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt,
) -> None:
    """Dollars spent, dollars per million tokens, the on-demand equivalent and the saving."""
    from mamba_training.aws.cost import cost_report
    from mamba_training.aws.logs import parse_since

    start = parse_since(since) if since else None
    ledgers = []
    if run:
        from mamba_training.train import report as run_report

        ledgers = run_report.load(run).ledgers
    result = cost_report(ledgers, project, start, use_cost_explorer=not no_cost_explorer, profile=profile)
    if as_json:
        print_json(result.to_dict())
        return
    out = console()
    table = Table("", "", title=f"cost of {run or 'project ' + project}", show_header=False)
    table.add_row("spent", money(result.cost_usd))
    table.add_row("per million tokens", money(result.usd_per_million_tokens))
    table.add_row("tokens", "-" if result.tokens is None else f"{result.tokens:,}")
    table.add_row("instance hours", "-" if result.instance_hours is None else f"{result.instance_hours:,.2f}")
    table.add_row("on-demand equivalent", money(result.on_demand_cost_usd))
    table.add_row("saving", "-" if result.saving_percent is None else f"{result.saving_percent:.1f}%")
    out.print(table)
    if result.pools:
        pools = Table("type", "AZ", "lifecycle", "hours", "cost")
        for p in result.pools:
            pools.add_row(p["instance_type"], p["availability_zone"], p["lifecycle"], f"{p['hours']:.2f}",
                          money(p["cost_usd"]))
        out.print(pools)
    out.print(f"source: {result.note}")


def advise(
    instance_types: list[str] = typer.Option([], "--instance-types", "-t",
                                             help="Candidate types (repeat or comma-separate); default: all known."),
    throughput_file: Optional[Path] = typer.Option(None, "--throughput-file",
                                                   help="CSV instance_type,tokens_per_s[,basis][,source] of your measurements."),
    restart_overhead: float = typer.Option(1.0, "--restart-overhead",
                                           help="Weight of the interruption rate in the expected cost."),
    top: int = typer.Option(4, "--top", min=1, help="How many types go into the tfvars line."),
    offline: bool = typer.Option(False, "--offline", help="Do not ask AWS for spot prices."),
    region: Optional[str] = RegionOpt, profile: Optional[str] = ProfileOpt, as_json: bool = JsonOpt,
) -> None:
    """Rank instance types by expected dollars per million training tokens."""
    from mamba_training.aws import advisor
    from mamba_training.aws.session import check_region

    resolved = check_region(region, profile)
    ranked, notes = advisor.advise(split_list(instance_types) or None, resolved, profile, throughput_file,
                                   restart_overhead, offline)
    line = advisor.tfvars_line(ranked, top)
    if as_json:
        print_json({"region": resolved, "ranking": [a.to_dict() for a in ranked], "notes": notes, "tfvars": line})
        return
    out = console()
    table = Table("#", "type", "$/M tokens", "tokens/s", "tokens/s is", "$/h", "interruptions", "price from",
                  "throughput from",
                  title=f"instance types by expected cost per token ({resolved})")
    for rank, a in enumerate(ranked, start=1):
        table.add_row(str(rank), a.instance_type, money(a.usd_per_million_tokens), 
                      "-" if a.tokens_per_s is None else f"{a.tokens_per_s:,.0f}", a.throughput_basis or "-",
                      money(a.usd_per_hour),
                      a.interruption_bucket, a.price_source, a.throughput_source)
    out.print(table)
    for note in notes:
        out.print(f"note: {note}")
    out.print("paste into terraform.tfvars:")
    typer.echo(line)


def report(
    store: str = typer.Argument(..., help="The run's store URL (directory or s3://...)."),
    out_path: Path = typer.Option(Path("report.png"), "--out", "-o", help="Where to write the PNG."),
    as_json: bool = JsonOpt,
) -> None:
    """A PNG of loss, tokens/s, interruptions and cost over time, and a one-screen summary."""
    from mamba_training.train import report as run_report

    records = run_report.load(store)
    facts = run_report.summary(records)
    written = run_report.plot(records, out_path)
    if as_json:
        print_json({**facts, "png": str(written)})
        return
    out = console()
    table = Table("", "", title=f"run {store}", show_header=False)
    rows = [
        ("segments (process lifetimes)", str(facts["segments"])),
        ("step", f"{facts['step']:,}"),
        ("tokens", f"{facts['tokens']:,}"),
        ("loss first -> last", _pair(facts["first_loss"], facts["last_loss"])),
        ("best val loss", "-" if facts["best_val_loss"] is None else f"{facts['best_val_loss']:.4f}"),
        ("median tokens/s", "-" if facts["median_tokens_per_s"] is None else f"{facts['median_tokens_per_s']:,.0f}"),
        ("wall time", f"{facts['wall_hours']:.2f} h"),
        ("interruptions", f"{facts['interruptions']} ({facts['lost_steps']} steps lost)"),
        ("cost", money(facts["cost_usd"])),
        ("per million tokens", money(facts["usd_per_million_tokens"])),
        ("last exit", facts["last_exit"] or "-"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)
    out.print(f"report: {written}")


def _pair(first: float | None, last: float | None) -> str:
    return "-" if first is None or last is None else f"{first:.4f} -> {last:.4f}"
