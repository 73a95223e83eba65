"""SIGKILL trials at scale: hundreds of kills of a process that checkpoints every step.

Runs tests/checkpoint/kill_trials.py (the same trial loop and invariants as the suite's 20 trials)
in several configurations, a few worker processes at a time, and checks after every kill that
latest.json names a checkpoint that verifies and restores bit for bit to the reference training
state, that it never went behind a commit the killed process reported, and that every checkpoint
with a manifest verifies.

Configurations: local folder and S3 (a moto server on loopback), each with a tiny checkpoint
(~25 KB) and a larger one (~9 MB). Each trial waits until the child has committed a drawn number
of checkpoints (0-3), then a drawn delay (up to the config's max), then kills it. A kill counts
only when it ended the child (wait status SIGKILL); the report says how many landed mid-save (a
save begun, its latest.json write not yet returned) and how many during the restore. Seeds are
fixed per worker and written to the JSON.

    .venv/bin/python bench/kill_trials.py                     # 4 configs x 100 trials
    .venv/bin/python bench/kill_trials.py --trials 20 --jobs 2

Prints a table; writes bench/results/kill_trials.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TRIALS = REPO / "tests" / "checkpoint" / "kill_trials.py"

# name: (store kind, model width, seconds before the kill at most, steps per run)
CONFIGS = {
    "local-tiny": ("local", 16, 0.6, 25),
    "local-9MB": ("local", 65536, 2.0, 12),
    "s3-tiny": ("s3", 16, 1.0, 25),
    "s3-9MB": ("s3", 65536, 2.5, 12),
}


COUNTS = ("trials", "kills", "mid_save_kills", "restore_kills", "exited_before_kill", "completed_runs",
          "restore_checks")


def start_moto() -> tuple[subprocess.Popen, str]:
    from tests.conftest import start_moto as start

    return start()


def launch(config: str, worker: int, trials: int, workdir: Path) -> subprocess.Popen:
    kind, width, max_delay, steps = CONFIGS[config]
    work = workdir / f"{config}-{worker}"
    work.mkdir(parents=True)
    args = [sys.executable, str(TRIALS), "--trials", str(trials), "--steps", str(steps), "--max-delay",
            str(max_delay), "--seed", str(1000 * worker + len(config)), "--width", str(width), "--workdir", str(work)]
    if kind == "s3":
        from mamba_training.aws.session import client

        bucket = f"kill-{config.lower()}-{worker}".replace("_", "-")
        client("s3").create_bucket(Bucket=bucket)
        args += ["--store", f"s3://{bucket}/trials"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}"}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def merge(reports: list[dict]) -> dict:
    out = {key: 0 for key in COUNTS} | {"seeds": [], "problems": [], "seconds": 0.0}
    steps: list[int] = []
    for r in reports:
        for key in COUNTS:
            out[key] += r[key]
        out["seeds"].append(r["seed"])
        out["problems"] += r["problems"]
        out["seconds"] = max(out["seconds"], r["seconds"])
        steps += r["latest_steps"]
    out["latest_step_histogram"] = {str(s): steps.count(s) for s in sorted(set(steps))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="trials per configuration")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes per configuration")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "kill_trials.json")
    args = parser.parse_args()
    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    configs = [c for c in args.configs.split(",") if c]
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                     "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "trials_per_config": args.trials, "jobs": args.jobs, "configs": {}}
    moto = None
    try:
        if any(CONFIGS[c][0] == "s3" for c in configs):
            moto, url = start_moto()
            os.environ["AWS_ENDPOINT_URL"] = url
        with tempfile.TemporaryDirectory(prefix="kill-trials-") as tmp:
            for config in configs:
                per_worker = [args.trials // args.jobs + (1 if w < args.trials % args.jobs else 0)
                              for w in range(args.jobs)]
                procs = [launch(config, w, n, Path(tmp)) for w, n in enumerate(per_worker) if n]
                reports = []
                for proc in procs:
                    out, err = proc.communicate()
                    if proc.returncode != 0:
                        raise SystemExit(f"{config}: trial worker failed:\n{err[-3000:]}")
                    reports.append(json.loads(out.strip().splitlines()[-1]))
                merged = merge(reports)
                results["configs"][config] = {"store": CONFIGS[config][0], "width": CONFIGS[config][1],
                                              "max_delay_s": CONFIGS[config][2], "steps": CONFIGS[config][3],
                                              **merged}
                print(f"{config:12} {merged['trials']:4} trials  {merged['kills']:4} kills "
                      f"({merged['mid_save_kills']} mid-save)  {len(merged['problems'])} problems  "
                      f"({merged['seconds']:.0f}s)", flush=True)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
    print_table(results["configs"])
    results["total"] = {key: sum(c[key] for c in results["configs"].values()) for key in COUNTS}
    results["total"]["problems"] = sum(len(c["problems"]) for c in results["configs"].values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    if results["total"]["problems"]:
        raise SystemExit(1)


def print_table(configs: dict) -> None:
    header = (f"{'config':12} {'trials':>6} {'kills':>6} {'mid-save':>8} {'restore':>7} {'exited':>6} "
              f"{'finished':>8} {'checked':>7} {'problems':>8} {'seconds':>7}")
    print(header)
    print("-" * len(header))
    for name, c in configs.items():
        print(f"{name:12} {c['trials']:6} {c['kills']:6} {c['mid_save_kills']:8} {c['restore_kills']:7} "
              f"{c['exited_before_kill']:6} {c['completed_runs']:8} {c['restore_checks']:7} "
              f"{len(c['problems']):8} {c['seconds']:7.0f}")
        for problem in c["problems"][:5]:
            print(f"    {problem}")


if __name__ == "__main__":
    main()
