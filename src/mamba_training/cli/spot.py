"""`mamba-training spot ...`: the IMDS emulator for rehearsing interruptions."""

import typer

app = typer.Typer(help="Spot interruption tools (IMDS emulator).", no_args_is_help=True)
