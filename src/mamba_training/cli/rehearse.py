"""`mamba-training rehearse`: the whole spot fleet on this machine, with interruptions (docs/rehearse.md)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.live import Live


def register(app: typer.Typer) -> None:
    app.command("rehearse")(rehearse)


def rehearse(
    instances: int = typer.Option(2, "--instances", help="Most instances the fleet may run (the group's max)."),
    jobs: int = typer.Option(2, "--jobs", help="Tiny jobs to generate and submit."),
    submit: Optional[list[Path]] = typer.Option(None, "--submit", help="Submit this run config as a job "
                                                "(repeatable; instead of --jobs)."),
    nodes_per_job: int = typer.Option(1, "--nodes-per-job", help="Instances each job runs on at once."),
    interrupt_every: Optional[float] = typer.Option(None, "--interrupt-every", help="Mean seconds of busy time "
                                                    "between interruptions (seeded, exponential gaps)."),
    interruptions: Optional[int] = typer.Option(None, "--interruptions", help="Interruptions in all, spread over "
                                                "the jobs' progress (default 2)."),
    hard_kills: int = typer.Option(0, "--hard-kills", help="How many of the interruptions are kills without notice."),
    seed: int = typer.Option(0, "--seed", help="Seeds the interruption schedule and the market price."),
    notice_compression: float = typer.Option(8.0, "--notice-compression", help="The two-minute notice divided "
                                             "by this (8: 15 s)."),
    steps: int = typer.Option(60, "--steps", help="Steps of each generated job."),
    directory: Optional[Path] = typer.Option(None, "--dir", help="Folder for its files (default "
                                             "./rehearsals/<time>-seed<S>-<random>; must be new or empty)."),
    moto_port: int = typer.Option(0, "--moto-port", help="Port of the moto server on 127.0.0.1 (0: any free one)."),
    timeout: float = typer.Option(1800.0, "--timeout", help="Give up after this many seconds."),
    straight: bool = typer.Option(True, "--straight/--no-straight", help="Also train each single-node job without "
                                  "interruptions and compare the final weights bitwise."),
    instance_type: str = typer.Option("g4dn.xlarge", "--instance-type", help="Instance type the fleet is priced as."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON (no live view)."),
) -> None:
    """Rehearse the production flow on this machine: moto, the Terraform stack, reconciler, agents, interruptions."""
    from mamba_training.fleet.rehearsal import view
    from mamba_training.fleet.rehearsal.run import Options
    from mamba_training.fleet.rehearsal.run import rehearse as run_rehearsal

    options = Options(instances=instances, jobs=jobs, submit=tuple(submit or ()), nodes_per_job=nodes_per_job,
                      interrupt_every=interrupt_every, interruptions=interruptions, hard_kills=hard_kills, seed=seed,
                      notice_compression=notice_compression, steps=steps, directory=directory, moto_port=moto_port,
                      timeout=timeout, straight=straight, instance_type=instance_type)
    # SIGTERM ends it like Ctrl-C: the rehearsal's teardown ends every process it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    err = Console(stderr=True)
    if as_json:
        result = run_rehearsal(options)
    elif not sys.stderr.isatty():  # a log, not a live view: one line per phase
        phases: list[str] = []

        def note(snapshot) -> None:
            if not phases or phases[-1] != snapshot.phase:
                phases.append(snapshot.phase)
                err.print(f"rehearsal (seed {seed}) {snapshot.elapsed:6.1f} s: {snapshot.phase}", highlight=False)

        result = run_rehearsal(options, note)
    else:
        with Live(console=err, refresh_per_second=4, transient=True) as shown:
            result = run_rehearsal(options, lambda snapshot: shown.update(view.live(snapshot)))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        Console().print(view.summary(result))
