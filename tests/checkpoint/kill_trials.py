"""SIGKILL trials: a process trains a tiny model and saves every step; it is killed at random moments.

After every kill the run store is checked:
- latest.json, when present, names a checkpoint whose every file verifies, and whose state is
  bit for bit the reference training's state at that step;
- latest.json never goes back behind a commit the killed process had reported;
- every checkpoint that has a manifest verifies (a manifest is never written before its data).
The next trial resumes from the store, so kills land in restores, saves, commits and retention.

Kill moments come from a seeded RNG (the seed is in the report) and from the child's progress,
not from the machine's speed: each trial waits until the child has committed a drawn number of
checkpoints (0-3; 0 lets the kill land in the restore), then a drawn delay, then sends SIGKILL.
A kill counts only when it ended the child (its wait status says SIGKILL): a child that had
already finished is counted apart. The child marks in shared memory when a save begins and when
its latest.json write returns, so the report also says how many kills landed mid-save (a save
begun and not yet committed) and how many during the restore.

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
import mmap
import os
import random
import shutil
import signal
import struct
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # this checkout's package and its tests

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


class Progress:
    """Counters in memory shared with the forked child: what it was doing when it was killed."""

    FIELDS = ("restored", "saves_begun", "commits")

    def __init__(self) -> None:
        self._mem = mmap.mmap(-1, 8 * len(self.FIELDS))  # anonymous and shared: fork keeps it shared

    def get(self, name: str) -> int:
        return struct.unpack_from("q", self._mem, 8 * self.FIELDS.index(name))[0]

    def add(self, name: str, value: int = 1) -> None:
        struct.pack_into("q", self._mem, 8 * self.FIELDS.index(name), self.get(name) + value)

    def reset(self) -> None:
        for name in self.FIELDS:
            struct.pack_into("q", self._mem, 8 * self.FIELDS.index(name), 0)


def child(store_url: str, cache: Path, steps: int, width: int, report_fd: int, progress: Progress) -> None:
    """Resume and train to `steps`, saving every step; report each commit as it is seen."""
    state = build(SEED, width)
    mgr = CheckpointManager(store_url, policy=CheckpointPolicy(every_steps=1, keep_last=3, keep_every=10),
                            cache_dir=cache, writer_id=f"trial-{os.getpid()}")
    put_if = mgr.store.put_if

    def counted_put_if(key: str, data: bytes, etag: str | None) -> str:
        result = put_if(key, data, etag)
        if key == "latest.json":
            progress.add("commits")
        return result

    mgr.store.put_if = counted_put_if  # type: ignore[method-assign]
    info = mgr.restore(state)
    progress.add("restored")
    reported = info.step if info else 0
    for step in range((info.step if info else 0) + 1, steps + 1):
        train(state, 1)
        progress.add("saves_begun")
        mgr.save(step, state["trainer"].tokens_seen, state)
        commit = mgr.last_commit
        if commit is not None and commit.step > reported:
            reported = commit.step
            os.write(report_fd, f"{reported}\n".encode())
    commit = mgr.flush()
    os.write(report_fd, f"{commit.step}\ndone\n".encode())


def wait_for_commits(pid: int, progress: Progress, commits: int, timeout: float) -> int | None:
    """Wait until the child has committed `commits` checkpoints; its wait status if it ended first."""
    deadline = time.monotonic() + timeout
    while progress.get("commits") < commits and time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.001)
    return None


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
    progress = Progress()
    results = {"seed": seed, "trials": 0, "kills": 0, "mid_save_kills": 0, "restore_kills": 0,
               "exited_before_kill": 0, "completed_runs": 0, "problems": [], "latest_steps": [],
               "restore_checks": 0, "trials_after_a_commit": 0, "seconds": 0.0}
    started = time.monotonic()
    for trial in range(trials):
        store_url = f"{base}/run-{generation}"
        commits, delay = rng.randint(0, 3), rng.uniform(0.0, max_delay)
        progress.reset()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the trial process
            os.close(read_fd)
            code = 0
            try:
                child(store_url, workdir / f"cache-{trial}", steps, width, write_fd, progress)
            except BaseException as error:  # report and exit without running the parent's cleanup
                os.write(write_fd, f"error {type(error).__name__}: {error}\n".encode())
                code = 1
            os._exit(code)
        os.close(write_fd)
        status = wait_for_commits(pid, progress, commits, timeout=300)
        if status is None:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)  # a child that has exited is a zombie until reaped: no error
            status = os.waitpid(pid, 0)[1]
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if killed:  # it was alive when the signal came: the counters are where it stopped
            results["kills"] += 1
            results["restore_kills"] += progress.get("restored") == 0
            results["mid_save_kills"] += progress.get("saves_begun") > progress.get("commits")
        else:
            results["exited_before_kill"] += 1
        results["trials_after_a_commit"] += progress.get("commits") > 0
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
    parser.add_argument("--max-delay", type=float, default=0.6, help="most seconds after the drawn commit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--store", default=None, help="run store base (default: a folder in --workdir)")
    parser.add_argument("--width", type=int, default=16, help="hidden width of the tiny model (checkpoint size)")
    args = parser.parse_args()
    print(json.dumps(run_trials(args.workdir, args.trials, args.steps, args.max_delay, args.seed, args.store,
                                args.width)))


if __name__ == "__main__":
    main()
