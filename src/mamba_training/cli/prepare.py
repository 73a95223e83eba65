"""`mamba-training prepare SRC... OUT`: text files or folders into token shards."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from mamba_training.errors import UsageError


def register(app: typer.Typer) -> None:
    """Add the prepare command to the top-level app."""
    app.command("prepare")(prepare)


def prepare(
    paths: list[Path] = typer.Argument(..., help="Text files or folders (recursive), then the output folder."),
    tokenizer: str = typer.Option("byte", "--tokenizer", "-t", help="'byte' or a tokenizers JSON file."),
    val_fraction: float = typer.Option(0.05, "--val-fraction", help="Share of tokens held out for validation."),
    dtype: str = typer.Option("auto", "--dtype", help="Token dtype on disk: auto, uint16 or uint32."),
    as_json: bool = typer.Option(False, "--json", help="Print the resulting meta.json instead of a table."),
) -> None:
    """Tokenize text into memory-mapped train/validation shards plus meta.json."""
    if len(paths) < 2:
        raise UsageError("prepare needs at least one source and an output folder: prepare SRC... OUT")
    *sources, out = paths
    from mamba_training.data import prepare_corpus  # torch and numpy only when the command runs

    skipped = _SkippedFiles()  # the sources module logs each file of a folder it does not read

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]prepare"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=console, disable=as_json or not console.is_terminal,
    )
    with progress, skipped:
        task = progress.add_task("prepare", total=None)
        info = prepare_corpus(
            sources, out, tokenizer_spec=tokenizer, val_fraction=val_fraction, dtype=dtype,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    for line in skipped.lines:
        console.print(line, markup=False, highlight=False)
    if as_json:
        typer.echo(json.dumps(info.to_json(), indent=2))
        return
    # The folder goes on a line of its own: a long path in the title would squeeze the numbers.
    table = Table(title=f"{info.tokenizer}, vocab {info.vocab_size:,}, {info.dtype}")
    for column in ("split", "shards", "tokens", "bytes", "unigram entropy (nats/token)"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, split in info.splits.items():
        table.add_row(name, str(len(split.shards)), f"{split.tokens:,}",
                      f"{sum(s.bytes for s in split.shards):,}", f"{split.unigram_entropy_nats:.3f}")
    out_console = Console()
    out_console.print(table)
    dropped = f", {len(skipped.lines)} skipped (named above)" if skipped.lines else ""
    out_console.print(f"{len(info.sources)} source file(s){dropped}; wrote {out / 'meta.json'}", soft_wrap=True)


class _SkippedFiles(logging.Handler):
    """Collects the "skipping PATH: why" records of data.sources while a corpus is prepared."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._logger = logging.getLogger("mamba_training.data.sources")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("skipping "):
            self.lines.append(f"skipped {message.removeprefix('skipping ')}")

    def __enter__(self) -> "_SkippedFiles":
        self._level = self._logger.level
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)
