"""`mamba-training checkpoints ...`: list, show, verify, download, upload, prune a run store.

Parsing and printing only: the work is done by mamba_training.checkpoint's protocol module,
which needs no torch, so these commands start fast.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from mamba_training.errors import CheckpointError, UsageError

app = typer.Typer(help="Inspect and manage the checkpoints of a run store.", no_args_is_help=True)

STORE = typer.Argument(..., help="Run store: a directory, file:///path or s3://bucket/prefix.")
STEP = typer.Option(None, "--step", help="Checkpoint step (default: the one latest.json names).")


def _console() -> Console:
    return Console(highlight=False)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@contextmanager
def _progress() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Transfer bars on stderr; yields the (description, total) -> advance factory the library takes."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bars:
        def factory(description: str, total: int) -> Callable[[int], None]:
            task = bars.add_task(description, total=total)
            return lambda n: bars.advance(task, n)

        yield factory


def _open(url: str):
    from mamba_training.checkpoint import open_store

    return open_store(url)


def _summary_row(s: Any) -> dict[str, Any]:
    manifest = s.manifest or {}
    return {"step": s.step, "committed": s.committed, "latest": s.latest, "bytes": s.bytes,
            "tokens_seen": manifest.get("tokens_seen"), "world_size": manifest.get("world_size"),
            "writer_id": manifest.get("writer_id"), "time": manifest.get("time"), "path": s.path}


@app.command("list")
def list_command(store_url: str = STORE, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the checkpoints of a run, newest first."""
    from mamba_training.checkpoint import list_checkpoints

    store = _open(store_url)
    rows = [_summary_row(s) for s in list_checkpoints(store)]
    if as_json:
        typer.echo(json.dumps({"store": store.url, "checkpoints": rows}, indent=1))
        return
    if not rows:
        typer.echo(f"no checkpoints in {store.url}")
        return
    table = Table(title=f"checkpoints in {store.url}")
    for column in ("step", "state", "tokens", "size", "world", "written (UTC)", "writer"):
        table.add_column(column, justify="right" if column in ("step", "tokens", "size", "world") else "left")
    for r in rows:
        state = ("latest" if r["latest"] else "committed") if r["committed"] else "[red]incomplete[/red]"
        table.add_row(str(r["step"]), state, str(r["tokens_seen"] or ""), _size(r["bytes"]),
                      str(r["world_size"] or ""), r["time"] or "", r["writer_id"] or "")
    _console().print(table)


def _resolve_step(store: Any, step: Optional[int]) -> int:
    from mamba_training.checkpoint import list_checkpoints, read_latest

    if step is not None:
        return step
    pointer = read_latest(store)
    if pointer is not None:
        return pointer["step"]
    committed = [s.step for s in list_checkpoints(store) if s.committed]
    if not committed:
        raise CheckpointError(f"{store.url} holds no committed checkpoint")
    return committed[0]


@app.command("show")
def show(store_url: str = STORE, step: Optional[int] = STEP,
         as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON.")) -> None:
    """Show a checkpoint's manifest: step, tokens, writer, files, model shapes."""
    from mamba_training.checkpoint import list_checkpoints

    store = _open(store_url)
    chosen = _resolve_step(store, step)
    found = [s for s in list_checkpoints(store) if s.step == chosen]
    if not found:
        raise CheckpointError(f"{store.url} has no checkpoint step {chosen}")
    summary = found[0]
    if summary.manifest is None:
        raise CheckpointError(f"checkpoint {store.describe(summary.path)} has no readable manifest: not committed")
    manifest = summary.manifest
    if as_json:
        typer.echo(json.dumps({"store": store.url, "latest": summary.latest, **manifest}, indent=1))
        return
    console = _console()
    console.print(f"[bold]{store.describe(summary.path)}[/bold]{'  (latest)' if summary.latest else ''}")
    for key in ("step", "tokens_seen", "world_size", "writer_id", "time", "config_hash", "format_version"):
        console.print(f"  {key:15} {manifest.get(key)}")
    files = Table(title="files")
    for column in ("file", "size", "sha256"):
        files.add_column(column)
    for name, meta in manifest["files"].items():
        files.add_row(name, _size(int(meta["size"])), str(meta["sha256"])[:16] + "…")
    console.print(files)
    shapes = manifest.get("model_shapes", {})
    params = sum(_numel(shape) for shape in shapes.values())
    console.print(f"  model: {len(shapes)} tensors, {params:,} parameters")


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


@app.command("verify")
def verify(store_url: str = STORE, step: Optional[int] = STEP,
           all_steps: bool = typer.Option(False, "--all", help="Verify every committed checkpoint."),
           cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where S3 files are downloaded.")) -> None:
    """Check every file of a checkpoint against its manifest (size and sha256). Exit 1 on any mismatch."""
    from mamba_training.checkpoint import list_checkpoints, verify_checkpoint

    store = _open(store_url)
    steps = [s.step for s in list_checkpoints(store)] if all_steps else [_resolve_step(store, step)]
    if not steps:
        raise CheckpointError(f"{store.url} holds no checkpoint")
    failures = []
    with tempfile.TemporaryDirectory(prefix="mamba-verify-") as scratch, _progress() as progress:
        for s in steps:
            try:
                manifest, _ = verify_checkpoint(store, s, cache_dir or scratch, progress)
                typer.echo(f"ok      step {s}: {len(manifest['files'])} files match the manifest")
            except CheckpointError as error:
                failures.append(error)
                typer.echo(f"FAILED  step {s}: {error}")
    if failures:
        raise CheckpointError(f"{len(failures)} of {len(steps)} checkpoints failed verification: {failures[0]}")


@app.command("download")
def download(store_url: str = STORE, dest: Path = typer.Argument(..., help="Local folder to write into."),
             step: Optional[int] = STEP) -> None:
    """Download and verify a checkpoint (files + manifest) into a local folder."""
    from mamba_training.checkpoint import download_checkpoint

    store = _open(store_url)
    with _progress() as progress:
        manifest = download_checkpoint(store, step, dest, progress)
    typer.echo(f"downloaded step {manifest['step']} ({len(manifest['files'])} files, verified) to {dest}")


@app.command("upload")
def upload(store_url: str = STORE, src: Path = typer.Argument(..., help="A checkpoint folder (from `download`)."),
           no_latest: bool = typer.Option(False, "--no-latest", help="Do not move latest.json to it.")) -> None:
    """Upload a checkpoint folder into a run with the commit protocol (data, manifest, latest.json)."""
    from mamba_training.checkpoint import upload_checkpoint

    if not src.is_dir():
        raise UsageError(f"{src} is not a folder")
    store = _open(store_url)
    with _progress() as progress:
        step = upload_checkpoint(store, src, progress, set_latest=not no_latest)
    typer.echo(f"uploaded step {step} to {store.describe(f'checkpoints/step_{step:08d}')}")


@app.command("prune")
def prune(
    store_url: str = STORE,
    keep_last: int = typer.Option(..., "--keep-last", min=1, help="Keep this many newest committed checkpoints."),
    keep_every: int = typer.Option(0, "--keep-every", min=0, help="Also keep every step divisible by this."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print what would be removed."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Remove old checkpoints (and incomplete ones older than the newest). latest.json's is always kept."""
    from mamba_training.checkpoint import apply_retention, retention_plan

    store = _open(store_url)
    plan = retention_plan(store, keep_last, keep_every)
    if not plan.keys:
        typer.echo(f"nothing to prune in {store.url}")
        return
    steps = ", ".join(str(s) for s in plan.steps) or "none"
    typer.echo(f"would remove steps {steps} ({len(plan.keys)} objects) from {store.url}")
    if dry_run:
        return
    if not yes and not typer.confirm("remove them?", default=False):
        raise typer.Abort()
    apply_retention(store, plan)
    typer.echo(f"removed {len(plan.keys)} objects at {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}")
