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
from mamba_training.cli import checkpoints, costs, fleet, jobs, launch, prepare, rehearse, spot, train
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
launch.register(app)
app.add_typer(checkpoints.app, name="checkpoints")
app.add_typer(spot.app, name="spot")


def _plain_help(command, top: bool = True):
    """Help without type tags: flags show no `<bool>`, options and arguments their NAME.

    typer prints `--version <bool>`, `--set <list[str]>` and `{desired}`, which make flags look like
    they take values. Done once over the whole tree, so every command (present and future) reads alike.
    A sub-group's only option is --help: it is not listed, so its help has no near-empty Options box.
    """
    for param in command.params:
        _plain_param(param)
    make_help = command.get_help_option

    def help_option(ctx):
        option = make_help(ctx)
        if option is not None:
            _plain_param(option)
            option.hidden = not top and hasattr(command, "commands") and not any(
                _is_option(p) and not p.hidden for p in command.params)
        return option

    command.get_help_option = help_option  # type: ignore[method-assign]
    for sub in getattr(command, "commands", {}).values():
        _plain_help(sub, top=False)
    return command


def _is_option(param: object) -> bool:
    return hasattr(param, "is_flag")  # typer's options (it vendors its own click classes) and click's


def _plain_param(param) -> None:
    if _is_option(param):
        if param.is_flag or param.count:
            param.metavar = ""
        elif param.metavar is None:
            param.metavar = (param.name or "value").upper()
        return
    name = (param.metavar or param.name or "arg").strip("{}").upper()
    param.metavar = name
    param.display_type_rich = lambda ctx: None  # type: ignore[attr-defined]
    param._usage_display_name = (  # type: ignore[attr-defined]
        lambda: (name if param.required else f"[{name}]") + ("..." if param.nargs != 1 else ""))


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    command = _plain_help(typer.main.get_command(app))
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
