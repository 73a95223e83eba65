"""`mamba-training train`: parse options, run the trainer with a progress bar, print the outcome."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mamba_training import cli
from mamba_training.config import load_config
from mamba_training.logging_setup import log_progress, setup_logging


def _eta(pace: dict[str, float], p: dict) -> float | None:
    """Seconds to max_steps at the pace since the first step this process logged (None for that one)."""
    import time

    now = time.monotonic()
    if not pace:
        pace.update(step=float(p["step"]), time=now)
    done = p["step"] - pace["step"]
    if done <= 0:
        return None
    return (p["max_steps"] - p["step"]) * (now - pace["time"]) / done


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", metavar="FILE", help="YAML run config (default configs/tiny.yaml)."),
    overrides: list[str] = typer.Option([], "--set", "-s", metavar="KEY=VALUE", help="Override a key: section.key=value (repeatable)."),
    resume: str = typer.Option("auto", "--resume", metavar="auto|never", help="auto: continue from the newest committed checkpoint; never."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", metavar="FOLDER", help="Start from a Hugging Face Mamba folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train (or resume) a Mamba language model."""
    cfg = load_config(config, overrides)
    setup_logging(cfg.logging.level)
    import os

    from mamba_training.train import startup

    startup.pause_gc()  # until the first step: a replacement instance resumes sooner (train/startup.py)
    console = Console(stderr=True)
    is_main = os.environ.get("RANK", "0") == "0"
    show_bar = is_main and not quiet and console.is_terminal
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not show_bar,
    )
    task = progress.add_task("train", total=cfg.train.max_steps, detail="")
    last = {"loss": "", "speed": ""}
    pace: dict[str, float] = {}  # first step and time seen: the ETA is the pace since then

    def on_progress(p: dict) -> None:
        if p.get("tokens_per_s"):
            last.update(loss=f"loss {p['loss']:.3f}", speed=f"{p['tokens_per_s']:,.0f} tok/s")
            if is_main:  # under systemd (no terminal) this is all the operator sees of the progress
                log_progress(p["step"], p["max_steps"], p["loss"], p["tokens_per_s"], _eta(pace, p),
                             console=not show_bar, val_loss=p.get("val_loss"))
        detail = f"step {p['step']}/{p['max_steps']}  {last['loss']}  {last['speed']}"
        progress.update(task, completed=p["step"], detail=detail)

    def transfer(description: str, total: int):
        task_id = progress.add_task(description, total=total, detail="")

        def advance(n: int) -> None:
            progress.advance(task_id, n)
            done = progress.tasks[task_id].completed
            progress.update(task_id, detail=f"{done / 1e6:,.1f}/{total / 1e6:,.1f} MB")

        return advance

    try:
        with progress:
            if resume == "auto":  # download the checkpoint to resume from while torch imports
                from mamba_training.checkpoint import prefetch_latest

                prefetch_latest(cfg.checkpoint.store, cfg.checkpoint.cache_dir, transfer if is_main else None)
            from mamba_training.train.trainer import Trainer

            trainer = Trainer(cfg, resume=resume, init_from=str(init_from) if init_from else None,
                              on_progress=on_progress, transfer_progress=transfer)
            result = trainer.run()
    finally:
        startup.resume_gc()  # a run that failed before its first step leaves the collector on too
    cli.skip_teardown = True  # everything is written, uploaded and closed
    if not is_main:
        return
    from mamba_training.cli.fleet import console

    out = console()  # no terminal (systemd, a pipe): long lines stay whole in the log
    if result.status == "budget":
        out.print(f"[yellow]stopped:[/] {result.reason}; checkpoint step {result.step} committed in {result.store}")
        return
    if result.resumed_from is not None and result.resumed_from >= result.step:
        out.print(f"[green]already finished:[/] checkpoint step {result.step} reached train.max_steps "
                  f"({cfg.train.max_steps}); nothing to train, the final model was written again "
                  "(raise train.max_steps to train on)")
    else:
        since = "" if result.resumed_from is None else \
            f" ({result.step - result.resumed_from} here, resumed at step {result.resumed_from})"
        out.print(f"[green]done:[/] {result.step} steps{since}, {result.tokens_seen:,} tokens, "
                  f"{result.tokens_per_s:,.0f} tok/s over {result.elapsed_s:.1f}s")
    if result.val_loss is not None and result.unigram_entropy is not None:
        out.print(f"validation loss {result.val_loss:.4f} nats/token  vs  unigram entropy "
                  f"{result.unigram_entropy:.4f} nats/token of the corpus "
                  f"({result.val_loss / result.unigram_entropy:.0%} of it)")
    if result.final_dir is not None:
        out.print(f"final model: {result.final_dir} (transformers.MambaForCausalLM.from_pretrained loads it)")
    if result.loss_plot is not None:
        out.print(f"loss curve: {result.loss_plot}")
    if result.sample:
        out.print("sample:", style="bold")
        out.print(result.sample, markup=False, highlight=False)
