"""`mamba-training prepare SRC OUT`: text files or folders into token shards."""

import typer


def register(app: typer.Typer) -> None:
    """Add the prepare command to the top-level app."""
