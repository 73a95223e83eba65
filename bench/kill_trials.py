"""Hundreds of SIGKILL trials against the checkpoint commit protocol (the suite runs 20).

Each trial forks a process that resumes a tiny run from a local store and trains, saving every
step asynchronously; the parent kills it with SIGKILL after a random delay and checks the store:
latest.json names a checkpoint that verifies and restores bit for bit to the reference state,
never goes behind a commit the process reported, and every manifest's files verify.
See tests/checkpoint/kill_trials.py.

    .venv/bin/python bench/kill_trials.py --trials 300

Writes bench/results/kill_trials.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.checkpoint.kill_trials import run_trials  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--max-delay", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kill_trials.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kill-trials-") as tmp:
        report = run_trials(Path(tmp), args.trials, args.steps, args.max_delay, args.seed)
    report.update(seed=args.seed, steps=args.steps, max_delay=args.max_delay,
                  time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    steps = report.pop("latest_steps")
    report["latest_step_histogram"] = {str(s): steps.count(s) for s in sorted(set(steps))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{report['trials']} trials, {report['kills']} kills, {report['completed_runs']} completed runs, "
          f"{report['restore_checks']} bitwise restore checks, {len(report['problems'])} problems "
          f"in {report['seconds']} s -> {args.out}")
    for problem in report["problems"][:20]:
        print("  " + problem)
    if report["problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
