"""The `mamba-training` command: one typer app; each command group lives in its own module.

Errors are mapped to exits here and only here: a `MambaTrainingError` becomes one line on
stderr and its exit code (2 usage, 1 runtime, 75 preempted); never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import click
import typer

from mamba_training import __version__, cli
from mamba_training.cli import checkpoints, costs, fleet, jobs, prepare, rehearse, spot, train
from mamba_training.errors import EXIT_USAGE, MambaTrainingError, Preempted

try:
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # older typer uses click itself
    _TyperClickException = click.ClickException

app = typer.Typer(
    name="mamba-training",
    help="Train Mamba language models on AWS spot fleets without losing work.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mamba-training {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Train Mamba language models on AWS spot fleets without losing work."""


train.register(app)
prepare.register(app)
fleet.register(app)
costs.register(app)
jobs.register(app)
rehearse.register(app)
app.add_typer(checkpoints.app, name="checkpoints")
app.add_typer(spot.app, name="spot")


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="mamba-training", standalone_mode=False)
    except (click.exceptions.Abort, typer.Abort):
        typer.echo("aborted", err=True)
        code = 1
    except (click.ClickException, _TyperClickException) as error:  # typer >= 0.29 vendors its own click
        error.show()
        code = error.exit_code
    except MambaTrainingError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        typer.echo(f"error: {message}", err=True)
        code = error.exit_code
        if isinstance(error, Preempted) and argv is None:
            _exit_now(code)  # the state is durable; skip seconds of interpreter teardown inside the stop budget
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        code = 130
    code = code if isinstance(code, int) else 0
    if code == 0 and argv is None and cli.skip_teardown:
        _exit_now(code)
    sys.exit(code)


def _exit_now(code: int) -> None:
    """End the process at once: output flushed, log handlers closed, no interpreter teardown."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["app", "main", "EXIT_USAGE"]
