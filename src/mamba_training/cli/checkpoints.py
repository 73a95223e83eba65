"""`mamba-training checkpoints ...`: list, show, verify, download, upload, prune a store."""

import typer

app = typer.Typer(help="Inspect and manage the checkpoints of a run store.", no_args_is_help=True)
