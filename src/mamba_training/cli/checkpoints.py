"""`mamba-training checkpoints ...`: list, show, verify, download, upload, prune a run store.

    checkpoints list     STORE_URL [--json]
    checkpoints show     STORE_URL [STEP] [--json]
    checkpoints verify   STORE_URL [STEP] [--all] [--cache-dir DIR]
    checkpoints download STORE_URL STEP DEST
    checkpoints upload   SRC_DIR STORE_URL [--no-latest]
    checkpoints prune    STORE_URL --keep-last K [--keep-every M] [--dry-run] [--yes]

STEP is a step number or `latest` (the checkpoint latest.json names, else the newest committed).
Parsing and printing only: the work is done by mamba_training.checkpoint's protocol module, which
needs no torch, so these commands start fast. Transfer bars are rich progress bars made here and
handed to the library as a `(description, total_bytes) -> advance(bytes)` factory.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from mamba_training.errors import UsageError

app = typer.Typer(help="Inspect and manage the checkpoints of a run store.", no_args_is_help=True)

STORE = typer.Argument(..., metavar="STORE_URL", help="Run store: a directory, file:///path or s3://bucket/prefix.")
JSON = typer.Option(False, "--json", help="Print JSON instead of tables.")


def _console() -> Console:
    return Console(highlight=False)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@contextmanager
def _progress() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """Transfer bars on stderr; yields the (description, total) -> advance factory the library takes.

    Bars only draw on a terminal, so scripted use (and --json) gets clean output.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bars:
        def factory(description: str, total: int) -> Callable[[int], None]:
            task = bars.add_task(description, total=total)
            return lambda n: bars.advance(task, n)

        yield factory


def _open(url: str) -> Any:
    from mamba_training.checkpoint import open_store

    return open_store(url)


def _parse_step(text: Optional[str]) -> Optional[int]:
    """None for 'latest' (or nothing), else a non-negative step number."""
    if text is None or text == "latest":
        return None
    if not text.isdigit():
        raise UsageError(f"step {text!r} is not a step number or 'latest'")
    return int(text)


def _resolve_step(store: Any, text: Optional[str]) -> int:
    """The step asked for; an explicit one must exist in the store (bad input otherwise)."""
    from mamba_training.checkpoint import latest_committed_step, list_checkpoints

    step = _parse_step(text)
    if step is None:
        return latest_committed_step(store)
    if step not in {s.step for s in list_checkpoints(store)}:
        raise UsageError(f"{store.url} has no checkpoint step {step}")
    return step


def _summary_row(s: Any) -> dict[str, Any]:
    manifest = s.manifest or {}
    return {"step": s.step, "committed": s.committed, "latest": s.latest, "bytes": s.bytes,
            "tokens_seen": manifest.get("tokens_seen"), "world_size": manifest.get("world_size"),
            "writer_id": manifest.get("writer_id"), "time": manifest.get("time"), "path": s.path}


@app.command("list")
def list_command(store_url: str = STORE, as_json: bool = JSON) -> None:
    """List the checkpoints of a run, newest first."""
    from mamba_training.checkpoint import list_checkpoints, read_latest

    store = _open(store_url)
    rows = [_summary_row(s) for s in list_checkpoints(store)]
    pointer = read_latest(store)
    if as_json and (rows or not _nothing_there(store)):
        typer.echo(json.dumps({"store": store.url, "latest_json": pointer, "checkpoints": rows}, indent=1))
        return
    if not rows:
        if _nothing_there(store):  # most often a typo in the run's name
            raise UsageError(f"{store.url} does not exist (nothing is stored there): check the run's name")
        typer.echo(f"no checkpoints in {store.url}")
        return
    console = _console()
    wide = console.width >= 100  # the writer id is long; 80 columns show the rest (--json has everything)
    table = Table(title=f"checkpoints in {store.url}", box=box.SIMPLE_HEAD)
    for column in ("step", "commit", "latest", "size", "tokens", "world", "time (UTC)", *(["writer"] if wide else [])):
        table.add_column(column, justify="right" if column in ("step", "size", "tokens", "world") else "left",
                         no_wrap=True)
    for r in rows:
        when = (r["time"] or "").replace("T", " ").rstrip("Z")
        table.add_row(str(r["step"]), "yes" if r["committed"] else "[red]no[/red]", "yes" if r["latest"] else "",
                      _size(r["bytes"]), _opt(r["tokens_seen"]), _opt(r["world_size"]), when,
                      *([r["writer_id"] or ""] if wide else []))
    console.print(table)
    if pointer is None:
        console.print("latest.json is missing or unreadable: readers use the newest verified checkpoint")


def _nothing_there(store: Any) -> bool:
    """No folder (local store), or no object under the prefix (S3): the store does not exist."""
    root = store.local_path("")
    if root is not None:
        return not Path(root).is_dir()
    return not store.list()


def _opt(value: Any) -> str:
    return "" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


@app.command("show")
def show(store_url: str = STORE,
         step: Optional[str] = typer.Argument(None, metavar="STEP", help="Step number or 'latest' (default)."),
         as_json: bool = JSON) -> None:
    """Show a checkpoint's manifest: step, tokens, writer, files, model shapes."""
    from mamba_training.checkpoint import list_checkpoints
    from mamba_training.errors import CheckpointError

    store = _open(store_url)
    chosen = _resolve_step(store, step)
    summary = next(s for s in list_checkpoints(store) if s.step == chosen)
    if summary.manifest is None:
        raise CheckpointError(f"checkpoint {store.describe(summary.path)} has no readable manifest: not committed")
    manifest = summary.manifest
    if as_json:
        typer.echo(json.dumps({"store": store.url, "latest": summary.latest, "bytes": summary.bytes, **manifest},
                              indent=1))
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
def verify(store_url: str = STORE,
           step: Optional[str] = typer.Argument(None, metavar="STEP", help="Step number or 'latest' (default)."),
           all_steps: bool = typer.Option(False, "--all", help="Verify every checkpoint in the store."),
           cache_dir: Optional[Path] = typer.Option(None, "--cache-dir",
                                                    help="Keep S3 downloads here (default: a temporary folder).")
           ) -> None:
    """Check every file of a checkpoint against its manifest (size, sha256); exit 1 naming the first bad file."""
    from mamba_training.checkpoint import list_checkpoints, verify_checkpoint
    from mamba_training.errors import CheckpointError

    store = _open(store_url)
    if all_steps:
        steps = [s.step for s in list_checkpoints(store)]
        if not steps:
            raise CheckpointError(f"{store.url} holds no checkpoint")
    else:
        steps = [_resolve_step(store, step)]
    failures = []
    with tempfile.TemporaryDirectory(prefix="mamba-verify-") as scratch, _progress() as progress:
        for s in steps:
            try:
                manifest, _ = verify_checkpoint(store, s, cache_dir or scratch, progress)
                typer.echo(f"ok      step {s}: {len(manifest['files'])} files match the manifest")
            except CheckpointError as error:
                if len(steps) == 1:
                    raise  # its one line is the error itself
                failures.append(s)
                typer.echo(f"FAILED  step {s}: {error}")
    if failures:
        raise CheckpointError(f"{len(failures)} of {len(steps)} checkpoints failed verification "
                              f"(steps {', '.join(map(str, failures))}; each is named above)")


@app.command("download")
def download(store_url: str = STORE,
             step: str = typer.Argument(..., metavar="STEP", help="Step number or 'latest'."),
             dest: Path = typer.Argument(..., metavar="DEST", help="Local folder to write the files and manifest into.")) -> None:
    """Download a checkpoint, verify it, and write its files and manifest into DEST."""
    from mamba_training.checkpoint import download_checkpoint

    store = _open(store_url)
    chosen = _resolve_step(store, step)
    with _progress() as progress:
        manifest = download_checkpoint(store, chosen, dest, progress)
    typer.echo(f"downloaded step {manifest['step']} ({len(manifest['files'])} files, verified) to {dest}")


@app.command("upload")
def upload(src_dir: Path = typer.Argument(..., metavar="SRC_DIR", help="A checkpoint folder (a step_<N> folder "
                                      "of a local run, or what `download` wrote)."),
           store_url: str = STORE,
           no_latest: bool = typer.Option(False, "--no-latest", help="Do not move latest.json to it.")) -> None:
    """Copy a checkpoint folder into a run with the commit protocol: data files, manifest, then latest.json."""
    from mamba_training.checkpoint import upload_checkpoint

    if not src_dir.is_dir():
        raise UsageError(f"{src_dir} is not a folder")
    store = _open(store_url)
    with _progress() as progress:
        step = upload_checkpoint(store, src_dir, progress, set_latest=not no_latest)
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
    steps = ", ".join(str(s) for s in plan.steps) or "none (only stray files)"
    typer.echo(f"would remove steps {steps} ({len(plan.keys)} objects) from {store.url}")
    if dry_run:
        return
    if not yes and not typer.confirm("remove them?", default=False):
        raise typer.Abort()
    apply_retention(store, plan)
    typer.echo(f"removed {len(plan.keys)} objects")
