"""Multi-node benchmark: two `launch` nodes on loopback, one of them stopped; how long the
survivor stands still and how many steps the run loses.

A coordinator and two nodes (gloo, one trainer process each, the tiny model made smaller so a
step is ~0.1 s on two busy cores) train one run; once the run is past step --at at world size 2,
one node is stopped:
  notice   a spot interruption notice from that node's IMDS emulator (the production path)
  sigterm  SIGTERM to that node's launcher (systemd stopping the unit)
  kill     SIGKILL to that node's whole process group (the instance vanishes)
  freeze   SIGSTOP to it (a network cut: no TCP reset); SIGKILLed once the survivor re-formed
The run checkpoints every --every steps (25), so a node lost without warning costs the steps
since the last commit. Measured, from the run's files and logs as they appear (polled every 20 ms):
  detected     stop -> the survivor's trainer reports the lost peer (freeze: bounded by
               train.collective_timeout_s, --collective-timeout, default 60 s)
  downtime     stop -> first step of the survivor at world size 1
  steps lost   steps trained before the stop that the resumed run trains again
  steps/s      over the last 10 steps before the stop and the first 10 after
  step ms      median time between steps before (past the first 10) and after, from the
               trainer's own metrics (elapsed_s): robust to other load on the machine
The first measured run's launch logs are left in --keep DIR when given.

    .venv/bin/python bench/multinode.py                        # notice to the node without rank 0
    .venv/bin/python bench/multinode.py --stop kill --stop sigterm --warn rank0
    .venv/bin/python bench/multinode.py --stop freeze --collective-timeout 20

Writes bench/results/multinode.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--set", "model.d_model=32", "--set", "model.n_layer=1", "--set", "train.seq_len=32",
         "--set", "train.batch_size=4", "--set", "train.log_every=1", "--set", "train.eval_every=100000",
         "--set", "train.warmup_steps=5", "--set", "train.threads=1", "-q"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def metric_lines(run: Path) -> list[tuple[str, int]]:
    """(segment, step) of every metrics line written so far."""
    out = []
    for path in sorted((run / "records").glob("*/metrics.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    out.append((path.parent.name, int(json.loads(line)["step"])))
                except (ValueError, KeyError):
                    pass  # a line being written
    return out


class Run:
    """A coordinator and two nodes in their own process groups; every process is ours."""

    def __init__(self, work: Path, stop: str, max_steps: int, every: int, collective_timeout: float) -> None:
        self.work, self.stop = work, stop
        self.run_dir = work / "run"
        self.env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        port = free_port()
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "mamba_training", "coordinator", "--port", str(port)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=(work / "coordinator.log").open("w"))
        wait_for(lambda: "listening" in (work / "coordinator.log").read_text(), 120, "the coordinator")
        self.emulators = []
        self.nodes: dict[str, subprocess.Popen] = {}
        for name in ("a", "b"):
            spot = ["--set", "spot.imds_url=off"]
            if stop == "notice":
                from mamba_training.spot.emulator import ImdsEmulator

                emulator = ImdsEmulator("127.0.0.1", 0)
                emulator.start()
                self.emulators.append(emulator)
                spot = ["--set", f"spot.imds_url={emulator.url}", "--set", "spot.poll_seconds=0.5"]
            args = [sys.executable, "-m", "mamba_training", "launch", "--coordinator", f"127.0.0.1:{port}",
                    "--nnodes", "1:2", "--", "--set", f"checkpoint.store={self.run_dir}",
                    "--set", f"train.max_steps={max_steps}", "--set", f"checkpoint.every_steps={every}",
                    "--set", f"train.collective_timeout_s={collective_timeout}", *SMALL, *spot]
            log = (work / f"node_{name}.log").open("w")
            self.nodes[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)  # its own group: signals to the test do not reach it

    def check_alive(self) -> None:
        for name, proc in self.nodes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"node {name} exited {proc.returncode} early; see {self.work}/node_{name}.log")

    def rank0_node(self) -> str | None:
        for name in self.nodes:
            text = (self.work / f"node_{name}.log").read_text()
            if "as group rank 0 of 2 nodes" in text:
                return name
        return None

    def stop_node(self, name: str) -> None:
        proc = self.nodes[name]
        if self.stop == "notice":
            emulator = self.emulators[list(self.nodes).index(name)]
            urllib.request.urlopen(urllib.request.Request(
                f"{emulator.url}/control/interrupt?action=terminate", method="POST"), timeout=5).read()
        elif self.stop == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:  # the agent and its trainers (torch starts them in sessions of their own) vanish or freeze
            self.signal_node(name, signal.SIGSTOP if self.stop == "freeze" else signal.SIGKILL)

    def signal_node(self, name: str, signum: int) -> None:
        proc = self.nodes[name]
        for pid in [*children(proc.pid), proc.pid]:
            os.kill(pid, signum)

    def said(self, name: str, text: str) -> bool:
        return text in (self.work / f"node_{name}.log").read_text()

    def close(self) -> None:
        for proc in self.nodes.values():
            if proc.poll() is None:
                for pid in [*children(proc.pid), proc.pid]:
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
        self.coordinator.terminate()
        self.coordinator.wait()
        for emulator in self.emulators:
            emulator.stop()


def step_ms_median(run: Path, segments: set[str], skip: int) -> float | None:
    """Median time between consecutive steps of these segments, from the trainer's own elapsed_s
    (monotonic, ms resolution; the first `skip` steps of each segment are warm-up)."""
    intervals = []
    for segment in segments:
        path = run / "records" / segment / "metrics.jsonl"
        elapsed = [json.loads(line)["elapsed_s"] for line in path.read_text().splitlines()
                   if line.strip() and "elapsed_s" in line] if path.exists() else []
        elapsed = elapsed[skip:]
        intervals += [b - a for a, b in zip(elapsed, elapsed[1:])]
    return round(1000 * statistics.median(intervals), 1) if intervals else None


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(what)


def trial(stop: str, warn: str, at: int, max_steps: int, every: int, collective_timeout: float,
          keep: Path | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-multinode-"))
    run = Run(work, stop, max_steps, every, collective_timeout)
    seen: dict[tuple[str, int], float] = {}

    def poll(check: bool = True) -> list[tuple[str, int]]:
        if check:
            run.check_alive()
        lines = metric_lines(run.run_dir)
        now = time.monotonic()
        for key in lines:
            seen.setdefault(key, now)
        return lines

    try:
        wait_for(lambda: any(step >= at for _, step in poll()), 600, f"step {at} at world size 2")
        rank0 = run.rank0_node()
        warned = rank0 if warn == "rank0" else ({"a", "b"} - {rank0}).pop()
        old_segments = {seg for seg, _ in seen}
        survivor = ({"a", "b"} - {warned}).pop()
        t_stop = time.monotonic()
        run.stop_node(warned)
        detected = None
        if stop in ("kill", "freeze"):  # the survivor's trainer fails its collective and says so
            wait_for(lambda: run.said(survivor, "error: a peer stopped answering"), 600, "the lost peer")
            detected = time.monotonic() - t_stop
        if stop == "freeze":
            wait_for(lambda: run.said(survivor, "as group rank 0 of 1 nodes"), 300, "the re-form")
            run.signal_node(warned, signal.SIGKILL)  # the frozen instance never comes back
        new = wait_for(lambda: [k for k in poll(check=False) if k[0] not in old_segments], 300,
                       "a step after the re-form")
        t_first = min(seen[k] for k in new)
        wait_for(lambda: poll(check=False) and all(p.poll() is not None for p in run.nodes.values()), 900,
                 "both nodes to exit")
        codes = {warned: run.nodes[warned].returncode, survivor: run.nodes[survivor].returncode}
    finally:
        run.close()
    before = sorted(t for (seg, _), t in seen.items() if seg in old_segments)
    after = sorted(t for (seg, _), t in seen.items() if seg not in old_segments)
    last_before = max(step for seg, step in seen if seg in old_segments)
    first_after = min(step for seg, step in seen if seg not in old_segments)
    final = max(step for _, step in seen)

    def rate(times: list[float]) -> float:
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0

    result = {
        "stop": stop, "warned": "rank0" if warned == rank0 else "other", "at_step": at,
        "checkpoint_every": every, "collective_timeout_s": collective_timeout,
        "detected_s": None if detected is None else round(detected, 2),
        "downtime_s": round(t_first - t_stop, 2), "steps_lost": max(0, last_before - (first_after - 1)),
        "last_step_before": last_before, "first_step_after": first_after, "final_step": final,
        "steps_per_s_before": round(rate(before[-10:]), 2), "steps_per_s_after": round(rate(after[:10]), 2),
        "exit_codes": {"warned": codes[warned], "survivor": codes[survivor]},
        "step_ms_median_before": step_ms_median(run.run_dir, old_segments, skip=10),
        "step_ms_median_after": step_ms_median(run.run_dir, {seg for seg, _ in seen} - old_segments, skip=0),
    }
    if keep is not None:
        shutil.copytree(work, keep / f"{stop}-{warn}", dirs_exist_ok=True, ignore=shutil.ignore_patterns("run"))
    shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stop", action="append", choices=["notice", "sigterm", "kill", "freeze"])
    parser.add_argument("--warn", choices=["other", "rank0"], default="other")
    parser.add_argument("--at", type=int, default=150, help="stop a node once this step is trained")
    parser.add_argument("--max-steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=25, help="checkpoint.every_steps of the run")
    parser.add_argument("--collective-timeout", type=float, default=60.0, help="train.collective_timeout_s")
    parser.add_argument("--keep", type=Path, default=None, help="copy the logs of each trial here")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "multinode.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    results = []
    for stop in args.stop or ["notice"]:
        result = trial(stop, args.warn, args.at, args.max_steps, args.every, args.collective_timeout, args.keep)
        results.append(result)
        detected = "-" if result["detected_s"] is None else f"{result['detected_s']:.2f} s"
        print(f"{stop:8s} warned={result['warned']:6s} detected {detected:>8s}  "
              f"downtime {result['downtime_s']:6.2f} s  "
              f"steps lost {result['steps_lost']}  steps/s {result['steps_per_s_before']:.2f} -> "
              f"{result['steps_per_s_after']:.2f}  final step {result['final_step']}  exits {result['exit_codes']}",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "two launch nodes (gloo, 1 process each, tiny model d_model 32, 1 layer, batch 4 x 32 "
                "tokens, a checkpoint every --every steps), one stopped at step --at; detected = stop -> the "
                "survivor's trainer reports the lost peer (kill, freeze); downtime = stop -> first step at "
                "world size 1",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]},
        "trials": results,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
