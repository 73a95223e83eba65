"""Goodput under spot interruptions: replay an interruption every K steps with real restarts.

Trains the default job (configs/tiny.yaml) once without interruptions, then again with a spot
notice from the IMDS emulator every K steps: each notice makes the `mamba-training train`
process commit an emergency checkpoint and exit 75, and a new process with an empty local
cache (a replacement instance) resumes from the store — the moto server's S3 by default.

Reports
  goodput          useful training time / total wall time of the whole trace, where useful
                   time is the training-loop time of every step that survives into the final
                   model (each step once) and total time includes every process start, resume,
                   emergency checkpoint and exit
  steps lost       per interruption, from the exit records (steps trained but not committed)
  notice->durable  seconds from the watcher seeing the notice to the checkpoint being durable
                   (trainer-measured), and from the notice being posted to the process exit
and checks the goal: goodput >= 95 % with an interruption every 200 steps, no step lost.

    .venv/bin/python bench/spot.py                       # K=200, 3 interruptions, S3 (moto)
    .venv/bin/python bench/spot.py --every 50 --interruptions 2 --store local   # quick
    .venv/bin/python bench/spot.py --poll-seconds 0.2 --set model.d_model=32 --set model.n_layer=2 \
        --set train.batch_size=4 --set train.seq_len=32 --set train.threads=1    # the test-sized model

Goodput is roughly K*t / (K*t + overhead) for step time t, so it says as much about the step
time as about the interruption path; the summary also gives the step time at which one
interruption per K steps costs 5 %.

Writes bench/results/spot.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mamba_training.spot.emulator import ImdsEmulator

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
sys.path.insert(0, str(REPO))
BUCKET = "spot-bench"


@dataclass
class Segment:
    """One training process of the trace."""

    index: int
    wall_s: float
    exit_code: int
    notice_posted_at_step: int | None = None
    notice_to_exit_s: float | None = None
    stopped_at_step: int | None = None
    lost_steps: int | None = None
    notice_to_durable_s: float | None = None
    loop_s: float | None = None
    overhead_s: float | None = None  # process wall time outside the training loop: start, resume, exit
    startup_s: float | None = None  # process start to the first step (trainer-measured): imports, restore
    ending_s: float | None = None  # the rest of the overhead: emergency checkpoint (or final save) and exit


@dataclass
class Trace:
    total_s: float
    useful_s: float
    segments: list[Segment] = field(default_factory=list)

    @property
    def goodput(self) -> float:
        return self.useful_s / self.total_s


def start_moto() -> tuple[subprocess.Popen, str]:
    from tests.conftest import start_moto as start  # the one way the tests and benches start moto

    return start()


def child_env(endpoint: str | None) -> dict[str, str]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    env.pop("AWS_PROFILE", None)
    env.pop("AWS_ENDPOINT_URL", None)
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    return env


class Process:
    def __init__(self, workdir: Path, name: str, store: str, sets: list[str], endpoint: str | None) -> None:
        self.cache = workdir / f"cache-{name}"  # empty: a fresh instance
        self.log = workdir / f"{name}.log"
        args = ["train", "-c", str(REPO / "configs" / "tiny.yaml"), "--quiet"]
        for item in [*sets, f"checkpoint.store={store}", f"checkpoint.cache_dir={self.cache}"]:
            args += ["--set", item]
        self.started = time.monotonic()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "mamba_training", *args], cwd=workdir,
                                         stdout=out, stderr=subprocess.STDOUT, env=child_env(endpoint))

    def latest_step(self, local_run: Path | None) -> int:
        """The highest step logged so far (every segment resumes where the last one stopped)."""
        best = 0
        for root in [self.cache] + ([local_run] if local_run else []):
            for path in root.glob("**/records/*/metrics.jsonl"):
                with open(path, "rb") as fh:  # the last lines only: the bench must not compete for the CPU
                    fh.seek(max(0, path.stat().st_size - 1024))
                    tail = fh.read().decode(errors="replace")
                for line in tail.splitlines()[-3:]:
                    try:
                        best = max(best, int(json.loads(line)["step"]))
                    except (ValueError, KeyError):  # a partial first line of the tail, or mid-write
                        continue
        return best

    def wait(self, timeout: float = 3600) -> int:
        code = self.proc.wait(timeout)
        self.wall_s = time.monotonic() - self.started
        return code


def run_trace(workdir: Path, name: str, store: str, sets: list[str], endpoint: str | None,
              emulator: ImdsEmulator | None, every: int, interruptions: int, local_run: Path | None) -> Trace:
    """Train to the end, posting a spot notice each time another `every` steps have been trained."""
    segments: list[Segment] = []
    start = time.monotonic()
    for index in range(interruptions + 1 if emulator else 1):
        if emulator:
            emulator.reset()
        proc = Process(workdir, f"{name}-{index}", store, sets, endpoint)
        target = (index + 1) * every
        notice_step, notice_posted = None, None
        try:
            if emulator and index < interruptions:
                while proc.proc.poll() is None and (notice_step := proc.latest_step(local_run)) < target:
                    time.sleep(0.05)
                emulator.interrupt("terminate")
                notice_posted = time.monotonic()
            code = proc.wait()
        finally:
            if proc.proc.poll() is None:  # interrupted bench: do not leave a trainer behind
                proc.proc.kill()
                proc.proc.wait()
        segment = Segment(index, proc.wall_s, code, notice_step)
        if notice_posted is not None:
            segment.notice_to_exit_s = time.monotonic() - notice_posted
        segments.append(segment)
        print(f"  segment {index}: exit {code} after {proc.wall_s:.1f} s", file=sys.stderr)
        if code not in (0, 75):
            raise SystemExit(f"training failed (exit {code}); see {proc.log}")
        if code == 0:
            break
    total = time.monotonic() - start
    return Trace(total, 0.0, segments)


def useful_seconds(metrics: list[dict]) -> tuple[float, dict[str, float]]:
    """Loop time of every step that survives, each step once (its last run), and loop time per segment."""
    by_segment: dict[str, list[dict]] = {}
    for row in metrics:
        by_segment.setdefault(row["segment"], []).append(row)
    last_run: dict[int, float] = {}
    loop: dict[str, float] = {}
    for segment in sorted(by_segment):
        rows = sorted(by_segment[segment], key=lambda r: r["step"])
        previous_elapsed, previous_step = 0.0, None
        for row in rows:
            steps = row["step"] - (previous_step if previous_step is not None else row["step"] - 1)
            per_step = (row["elapsed_s"] - previous_elapsed) / max(steps, 1)
            for step in range(row["step"] - steps + 1, row["step"] + 1):
                last_run[step] = per_step  # a later segment's run of a step replaces an earlier one
            previous_elapsed, previous_step = row["elapsed_s"], row["step"]
        loop[segment] = rows[-1]["elapsed_s"]
    return sum(last_run.values()), loop


def annotate(trace: Trace, store: str) -> None:
    from mamba_training.train.records import read_run

    records = read_run(store)
    trace.useful_s, loops = useful_seconds(records.metrics)
    exits = {e["segment"]: e for e in records.events if e["kind"] == "exit"}
    starts = {e["segment"]: e for e in records.events if e["kind"] in ("start", "resume")}
    for segment, name in zip(trace.segments, records.segments):
        event = exits.get(name, {})
        segment.stopped_at_step = event.get("step")
        segment.lost_steps = event.get("lost_steps")
        segment.notice_to_durable_s = event.get("notice_to_durable_s")
        segment.startup_s = starts.get(name, {}).get("startup_s")
        segment.loop_s = loops.get(name)
        if segment.loop_s is not None:
            segment.overhead_s = round(segment.wall_s - segment.loop_s, 2)
            if segment.startup_s is not None:
                segment.ending_s = round(segment.overhead_s - segment.startup_s, 2)


def summarize(baseline: Trace, trace: Trace, every: int, max_steps: int) -> dict:
    interrupted = [s for s in trace.segments if s.exit_code == 75]
    lost = [s.lost_steps for s in interrupted if s.lost_steps is not None]
    durable = [s.notice_to_durable_s for s in interrupted if s.notice_to_durable_s is not None]
    to_exit = [s.notice_to_exit_s for s in interrupted if s.notice_to_exit_s is not None]
    overhead = (trace.total_s - trace.useful_s) - (baseline.total_s - baseline.useful_s)
    per_interruption = overhead / max(len(interrupted), 1)
    return {
        "interrupt_every_steps": every,
        "interruptions": len(interrupted),
        "goodput": round(trace.goodput, 4),
        "goodput_without_interruptions": round(baseline.goodput, 4),
        "total_s": round(trace.total_s, 2),
        "useful_s": round(trace.useful_s, 2),
        "baseline_total_s": round(baseline.total_s, 2),
        "overhead_per_interruption_s": round(per_interruption, 2),
        # goodput ~ K*t / (K*t + overhead): the step time at which K steps per interruption reach 95 %
        "mean_step_s": round(trace.useful_s / max_steps, 4),
        "step_time_for_95pct_s": round(per_interruption * 19 / every, 3),
        "startup_s_per_resume": [s.startup_s for s in trace.segments[1:] if s.startup_s is not None],
        "ending_s_per_interruption": [s.ending_s for s in interrupted if s.ending_s is not None],
        "steps_lost_per_interruption": lost,
        "steps_lost_total": sum(lost),
        "notice_to_durable_s": {"median": round(statistics.median(durable), 3), "max": round(max(durable), 3)}
        if durable else None,
        "notice_posted_to_exit_s": {"median": round(statistics.median(to_exit), 3), "max": round(max(to_exit), 3)}
        if to_exit else None,
        "goal_met": trace.goodput >= 0.95 and sum(lost) == 0 and every <= 200,
    }


def print_table(summary: dict, trace: Trace) -> None:
    def num(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    print(f"{'segment':>7} {'exit':>4} {'notice@':>7} {'stop@':>6} {'lost':>4} {'->durable s':>11} "
          f"{'->exit s':>8} {'wall s':>7} {'loop s':>7} {'startup s':>9} {'ending s':>8}")
    for s in trace.segments:
        cells = [s.index, s.exit_code, s.notice_posted_at_step or "-", s.stopped_at_step or "-",
                 "-" if s.lost_steps is None else s.lost_steps, num(s.notice_to_durable_s, 2),
                 num(s.notice_to_exit_s, 2), num(s.wall_s, 1), num(s.loop_s, 1), num(s.startup_s, 2),
                 num(s.ending_s, 2)]
        print("{:>7} {:>4} {:>7} {:>6} {:>4} {:>11} {:>8} {:>7} {:>7} {:>9} {:>8}".format(*cells))
    print(f"goodput {summary['goodput']:.1%} (without interruptions {summary['goodput_without_interruptions']:.1%}); "
          f"{summary['interruptions']} interruptions, one every {summary['interrupt_every_steps']} steps; "
          f"steps lost {summary['steps_lost_total']}; overhead per interruption "
          f"{summary['overhead_per_interruption_s']} s; notice->durable {summary['notice_to_durable_s']}")
    print(f"mean step {summary['mean_step_s']} s; 95 % goodput at one interruption per "
          f"{summary['interrupt_every_steps']} steps needs steps of >= {summary['step_time_for_95pct_s']} s")
    print("goal (goodput >= 95 % at K <= 200, no step lost):", "met" if summary["goal_met"] else "NOT met")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=200, help="steps between interruptions (K)")
    parser.add_argument("--interruptions", type=int, default=3)
    parser.add_argument("--store", choices=["s3", "local"], default="s3")
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="spot.poll_seconds of the trainer")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra config override")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "spot.json")
    args = parser.parse_args(argv)

    max_steps = args.every * (args.interruptions + 1)
    sets = [f"train.max_steps={max_steps}", "train.log_every=1", "train.sample_tokens=0",
            "logging.tensorboard=false", "logging.plot=false", "logging.cloudwatch=off",
            f"spot.poll_seconds={args.poll_seconds}", *args.sets]
    moto = None
    with tempfile.TemporaryDirectory(prefix="spot-bench-") as tmp, ImdsEmulator(port=0) as emulator:
        workdir = Path(tmp)
        sets.append(f"data.cache_dir={workdir / 'data'}")
        try:
            endpoint = None
            if args.store == "s3":
                moto, endpoint = start_moto()
                os.environ.update(child_env(endpoint))
                from mamba_training.aws.session import client

                client("s3").create_bucket(Bucket=BUCKET)

            def store_of(name: str) -> tuple[str, Path | None]:
                if args.store == "s3":
                    return f"s3://{BUCKET}/{name}", None
                return str(workdir / name), workdir / name

            # Prepare the corpus once so neither trace pays for it.
            Process(workdir, "prepare", store_of("prepare")[0],
                    [*sets, "train.max_steps=1", "spot.imds_url=off"], endpoint).wait()
            print(f"baseline: {max_steps} steps without interruptions", file=sys.stderr)
            store, local = store_of("baseline")
            baseline = run_trace(workdir, "baseline", store, [*sets, f"spot.imds_url={emulator.url}"], endpoint, None,
                                 args.every, 0, local)
            annotate(baseline, store)
            print(f"trace: a notice every {args.every} steps", file=sys.stderr)
            store, local = store_of("trace")
            trace = run_trace(workdir, "segment", store, [*sets, f"spot.imds_url={emulator.url}"], endpoint, emulator,
                              args.every, args.interruptions, local)
            annotate(trace, store)
        finally:
            if moto is not None:
                moto.terminate()
                moto.wait(10)

    summary = summarize(baseline, trace, args.every, max_steps)
    print_table(summary, trace)
    result = {
        "benchmark": "spot",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "config": {"file": "configs/tiny.yaml", "max_steps": max_steps, "store": args.store, "overrides": sets[:-1]},
        "summary": summary,
        "baseline": {"total_s": round(baseline.total_s, 2), "useful_s": round(baseline.useful_s, 2),
                     "segments": [asdict(s) for s in baseline.segments]},
        "trace": {"total_s": round(trace.total_s, 2), "useful_s": round(trace.useful_s, 2),
                  "segments": [asdict(s) for s in trace.segments]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
