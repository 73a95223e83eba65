"""SIGKILL trials: a process trains a tiny model and saves every step; it is killed at random moments.

After every kill the run store is checked:
- latest.json, when present, names a checkpoint whose every file verifies, and whose state is
  bit for bit the reference training's state at that step;
- latest.json never goes back behind a commit the killed process had reported;
- every checkpoint that has a manifest verifies (a manifest is never written before its data).
The next trial resumes from the store, so kills land in restores, saves, commits and retention.

Run standalone (`python tests/checkpoint/kill_trials.py --trials 20 --workdir DIR`, or with
`--store s3://bucket/prefix` against an S3 endpoint) or from bench/kill_trials.py, which runs
hundreds. Each finished run is followed by a fresh one (run-<n>) so kills keep landing in saves.
The parent imports torch once and forks each trial process, so a trial costs milliseconds, not an
interpreter start; the child is a separate process and SIGKILL ends it like any other.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mamba_training.checkpoint import CheckpointManager, CheckpointPolicy, list_checkpoints, open_store, read_latest  # noqa: E402
from mamba_training.checkpoint import verify_checkpoint  # noqa: E402
from mamba_training.errors import CheckpointError  # noqa: E402
from tests.checkpoint.tiny import build, train, weights  # noqa: E402

SEED = 7


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(weights(state).items()):
        h.update(name.encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def reference(steps: int, width: int) -> list[str]:
    state = build(SEED, width)
    out = [digest(state)]
    for _ in range(steps):
        train(state, 1)
        out.append(digest(state))
    return out


def child(store_url: str, cache: Path, steps: int, width: int, report_fd: int) -> None:
    """Resume and train to `steps`, saving every step; report each commit as it is seen."""
    state = build(SEED, width)
    mgr = CheckpointManager(store_url, policy=CheckpointPolicy(every_steps=1, keep_last=3, keep_every=10),
                            cache_dir=cache, writer_id=f"trial-{os.getpid()}")
    info = mgr.restore(state)
    reported = info.step if info else 0
    for step in range((info.step if info else 0) + 1, steps + 1):
        train(state, 1)
        mgr.save(step, state["trainer"].tokens_seen, state)
        commit = mgr.last_commit
        if commit is not None and commit.step > reported:
            reported = commit.step
            os.write(report_fd, f"{reported}\n".encode())
    commit = mgr.flush()
    os.write(report_fd, f"{commit.step}\ndone\n".encode())


def check(store_url: str, cache: Path, expected: list[str], reported: int, width: int) -> tuple[int, list[str]]:
    """The store's invariants after a kill; returns (latest step or 0, problems)."""
    store = open_store(store_url)
    problems = []
    for summary in list_checkpoints(store):
        if summary.committed:
            try:
                verify_checkpoint(store, summary.step, cache)
            except CheckpointError as error:
                problems.append(f"committed step {summary.step} does not verify: {error}")
    pointer = read_latest(store)
    if pointer is None:
        if reported:
            problems.append(f"latest.json missing after step {reported} was committed")
        return 0, problems
    if pointer["step"] < reported:
        problems.append(f"latest.json at step {pointer['step']} went behind the reported commit {reported}")
    state = build(SEED, width)
    try:
        info = CheckpointManager(store_url, cache_dir=cache).restore(state)
    except CheckpointError as error:
        problems.append(f"latest.json names a checkpoint that does not restore: {error}")
        return pointer["step"], problems
    if info.step != pointer["step"]:
        problems.append(f"restore chose step {info.step}, latest.json names {pointer['step']}")
    if digest(state) != expected[info.step] or state["trainer"].step != info.step:
        problems.append(f"step {info.step} restored to a state that differs from the reference")
    return pointer["step"], problems


def run_trials(workdir: Path, trials: int, steps: int = 25, max_delay: float = 0.6, seed: int = 0,
               store: str | None = None, width: int = 16) -> dict:
    """`trials` kills of a trial process; `store` is a local folder (default: workdir) or s3://bucket/prefix."""
    torch.set_num_threads(1)  # no thread pools in the parent: forking stays safe
    rng = random.Random(seed)
    expected = reference(steps, width)
    base = (store or str(workdir / "runs")).rstrip("/")
    generation = 0
    results = {"trials": 0, "kills": 0, "completed_runs": 0, "problems": [], "latest_steps": [],
               "restore_checks": 0, "seconds": 0.0}
    started = time.monotonic()
    for trial in range(trials):
        store_url = f"{base}/run-{generation}"
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the trial process
            os.close(read_fd)
            code = 0
            try:
                child(store_url, workdir / f"cache-{trial}", steps, width, write_fd)
            except BaseException as error:  # report and exit without running the parent's cleanup
                os.write(write_fd, f"error {type(error).__name__}: {error}\n".encode())
                code = 1
            os._exit(code)
        os.close(write_fd)
        time.sleep(rng.uniform(0.0, max_delay))
        try:
            os.kill(pid, signal.SIGKILL)
            results["kills"] += 1
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        with os.fdopen(read_fd) as pipe:
            lines = pipe.read().split()
        if "error" in lines:
            results["problems"].append(f"trial {trial}: the trial process failed: {' '.join(lines)}")
        reported = max([int(x) for x in lines if x.isdigit()], default=0)
        latest, problems = check(store_url, workdir / f"check-{trial}", expected, reported, width)
        results["problems"] += [f"trial {trial}: {p}" for p in problems]
        results["latest_steps"].append(latest)
        results["restore_checks"] += 1 if latest else 0
        results["trials"] += 1
        if "done" in lines or latest >= steps:  # finished: start a new run so kills keep hitting saves
            results["completed_runs"] += 1
            generation += 1
            if store is None:
                shutil.rmtree(store_url, ignore_errors=True)
        shutil.rmtree(workdir / f"cache-{trial}", ignore_errors=True)
        shutil.rmtree(workdir / f"check-{trial}", ignore_errors=True)
    results["seconds"] = round(time.monotonic() - started, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--max-delay", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--store", default=None, help="run store base (default: a folder in --workdir)")
    parser.add_argument("--width", type=int, default=16, help="hidden width of the tiny model (checkpoint size)")
    args = parser.parse_args()
    print(json.dumps(run_trials(args.workdir, args.trials, args.steps, args.max_delay, args.seed, args.store,
                                args.width)))


if __name__ == "__main__":
    main()
