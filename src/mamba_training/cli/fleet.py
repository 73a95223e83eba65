"""Fleet commands: status, scale, stop, logs, prices, interruptions."""

import typer


def register(app: typer.Typer) -> None:
    """Add the fleet commands to the top-level app."""
