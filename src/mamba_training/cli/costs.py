"""Cost commands: cost, advise, report."""

import typer


def register(app: typer.Typer) -> None:
    """Add the cost commands to the top-level app."""
