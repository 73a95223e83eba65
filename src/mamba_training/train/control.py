"""A rehearsal and test facility: act on a training process at an exact step (docs/spot.md).

Environment (read once, when the trainer starts):

- `MAMBA_TRAINING_HOLD_AT=10[,24,...]` with `MAMBA_TRAINING_CONTROL_DIR=<dir>`: after this process
  completes step N, local rank 0 writes `<dir>/reached-N` (atomically: JSON with step and pid) and
  every rank waits until `<dir>/release-N` exists or a stop cause or spot event is pending (a
  signal, a notice seen by the watcher, a budget stop), polling every 10 ms; then the step
  boundary decides as usual. A test waits for `reached-N`, then signals, serves a notice or
  kills, and the stop happens at step N whatever the machine's speed.
- `MAMBA_TRAINING_FAKE_SECONDS_PER_STEP=S`: the cost ledger counts S seconds per step trained by
  this process instead of wall time, so the cost after k steps (and the step a budget stops
  at) is exact.

Unset, nothing here costs anything: no file is looked at and the ledger runs on wall time.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from mamba_training.errors import UsageError

HOLD_AT = "MAMBA_TRAINING_HOLD_AT"
CONTROL_DIR = "MAMBA_TRAINING_CONTROL_DIR"
FAKE_SECONDS_PER_STEP = "MAMBA_TRAINING_FAKE_SECONDS_PER_STEP"
POLL_SECONDS = 0.01


def reached_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"reached-{step}"


def release_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"release-{step}"


@dataclass(frozen=True)
class Control:
    hold_at: frozenset[int] = frozenset()
    directory: Path | None = None
    seconds_per_step: float | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Control":
        """Read the variables above; a bad value is a UsageError naming the variable."""
        hold_text = environ.get(HOLD_AT, "").strip()
        steps: set[int] = set()
        for part in filter(None, (p.strip() for p in hold_text.split(","))):
            try:
                step = int(part)
            except ValueError:
                raise UsageError(f"{HOLD_AT}={hold_text!r}: {part!r} is not a step number") from None
            if step < 0:
                raise UsageError(f"{HOLD_AT}={hold_text!r}: step {step} is negative")
            steps.add(step)
        directory = environ.get(CONTROL_DIR, "").strip() or None
        if steps and directory is None:
            raise UsageError(f"{HOLD_AT} is set but {CONTROL_DIR} is not: where should reached-N go?")
        fake_text = environ.get(FAKE_SECONDS_PER_STEP, "").strip()
        seconds = None
        if fake_text:
            try:
                seconds = float(fake_text)
            except ValueError:
                raise UsageError(f"{FAKE_SECONDS_PER_STEP}={fake_text!r} is not a number") from None
            if not seconds >= 0:
                raise UsageError(f"{FAKE_SECONDS_PER_STEP}={fake_text!r} must be >= 0")
        return cls(frozenset(steps), Path(directory) if directory else None, seconds)

    def ledger_clock(self, steps_done: Callable[[], int]) -> Callable[[], float]:
        """The cost ledger's clock: wall time, or S seconds per step this process has trained."""
        if self.seconds_per_step is None:
            return time.time
        origin, per_step = time.time(), self.seconds_per_step
        return lambda: origin + per_step * steps_done()

    def hold(self, step: int, *, writes: bool, pending: Callable[[], bool],
             agree: Callable[[bool], bool] = lambda leave: leave) -> None:
        """If `step` is a hold step: announce it (when `writes`) and wait for release or a cause.

        `pending()` polls this process's stop causes; `agree(leave)` is true once any rank wants
        to leave (an all-reduce across ranks), so all ranks leave the hold together."""
        if step not in self.hold_at or self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if writes:
            _write_atomically(reached_path(self.directory, step), json.dumps({"step": step, "pid": os.getpid()}))
        release = release_path(self.directory, step)
        while not agree(release.exists() or pending()):
            time.sleep(POLL_SECONDS)


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["Control", "HOLD_AT", "CONTROL_DIR", "FAKE_SECONDS_PER_STEP", "reached_path", "release_path"]
