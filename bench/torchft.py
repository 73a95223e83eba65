"""torchft 0.2.0 against our engine (torch elastic) on the two-node harness, in one invocation.

Everything runs on this machine, on loopback, with gloo and one trainer thread per process:
  plain     one process, no fault tolerance: the per-step baseline
  torchft   a `torchft_lighthouse` (its own process, --min_replicas 1, default 5 s heartbeat
            timeout) and two replica groups of one process each. Each group hosts its own
            TCPStore and runs torchft.Manager (gloo, min_replica_size 1, init_sync off: weights
            are seeded identically), torchft.DistributedDataParallel and torchft.Optimizer
  elastic   our engine: bench/multinode.py's trial (coordinator + two `launch` nodes)
The model and data are the package's: MambaLM (d_model 32, 1 layer, byte vocabulary), the bundled
corpus through BatchSampler (seed 1337, global batch 4 x 32 tokens split over the participants,
so the global batch never changes), AdamW from train/optim.py with its warmup-cosine schedule
(set by the committed step), gradient clipping at 1.0.

torchft trials (one group is hit once its step --at is committed):
  leave          the group exits cleanly after the step (manager shut down, exit 0): a noticed stop
  kill           SIGKILL of one group at a seeded moment 0-150 ms after step --at (--kill-repeats)
  kill-patched   the same, with a comm hook that returns the bucket when the all-reduce failed
                 (torchft's stock hook asserts on it); the step is then not committed
  join           after `leave`, once the survivor trained 30 more steps, a third group starts and
                 heals from the live survivor (HTTP checkpoint); these groups train until the
                 bench ends them (SIGKILL, once the joiner committed 20 steps with 2 participants)
Measured from each process's own per-step lines (time.monotonic, system-wide on Linux):
  downtime   stop -> the survivor's first committed step with 1 participant (as bench/multinode.py)
  gap        survivor's last 2-participant step -> its first 1-participant step
  steps lost committed steps trained again (torchft never rewinds: 0 unless a survivor crashed)
  steps/s    last 10 steps before the stop, first 10 after (as bench/multinode.py)
  step ms    median time between steps at 2 participants (past the first 10) and at 1; the
             plain loop's median is the baseline of the per-step overhead (robust to bursts of
             the other agents on this machine, which the 10-step rates are not)
A survivor that crashes is reported with its last error line, not retried.

    .venv/bin/python bench/torchft.py                      # every trial, ~5 min on two busy cores
    .venv/bin/python bench/torchft.py --trial leave --trial kill --no-elastic

Writes bench/results/torchft.json (or --out).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# This file is named torchft.py: drop its folder from the path so `import torchft` is the library.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

REPO = _HERE.parent
SEED = 1337
D_MODEL, N_LAYER, SEQ_LEN, BATCH = 32, 1, 32, 4


# ------------------------------------------------------------------ the training side (subprocesses)
def _build(max_steps: int):
    """Model, AdamW, sampler and schedule exactly as the trainer builds them for the tiny config."""
    import torch

    from mamba_training.config import TrainConfig
    from mamba_training.data import BatchSampler, TokenDataset, load_tokenizer, resolve_corpus
    from mamba_training.model import MambaConfig, MambaLM
    from mamba_training.train.optim import build_optimizer

    torch.set_num_threads(1)
    cfg = TrainConfig(max_steps=max_steps, seed=SEED, batch_size=BATCH, seq_len=SEQ_LEN, warmup_steps=5)
    prepared = resolve_corpus("bundled", "byte", 0.05, REPO / ".cache" / "mamba-training" / "data")
    sampler = BatchSampler(TokenDataset(prepared, "train"), SEQ_LEN, BATCH, SEED)
    torch.manual_seed(SEED)
    model = MambaLM(MambaConfig(d_model=D_MODEL, n_layer=N_LAYER, vocab_size=load_tokenizer("byte").vocab_size))
    return cfg, model, build_optimizer(model, cfg), sampler


def _loss(model, x, y):
    import torch.nn.functional as F

    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def plain_main(steps: int) -> None:
    """No fault tolerance: the loop every engine adds its per-step cost to."""
    import torch

    from mamba_training.train.optim import lr_factor

    cfg, model, optimizer, sampler = _build(steps)
    times = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        sampler.step = step
        x, y = sampler.next_batch()
        loss = _loss(model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.monotonic())
    window = times[10:]  # skip warm-up
    print(json.dumps({"steps": steps, "steps_per_s": round((len(window) - 1) / (window[-1] - window[0]), 2),
                      "step_ms_median": median_ms(window)}))


def _tolerant_hook(state, bucket):
    """torchft's DDP hook, except that a failed all-reduce (peer gone mid-step) hands the bucket
    back instead of asserting: the manager has the error, so should_commit says no."""
    import torch

    work = state.allreduce(bucket.buffer())
    work.wait()
    inner = getattr(work.get_future(), "_fut", None)
    if inner is None:
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(bucket.buffer())
        return done
    return inner


def worker_main(args: argparse.Namespace) -> None:
    """One replica group of one process; one JSON line per step (committed or not) to --log."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import torchft
    from mamba_training.train.optim import lr_factor

    cfg, model, inner, sampler = _build(args.max_steps)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # this group's own store

    def state_dict():
        return {"model": model.state_dict(), "optim": inner.state_dict()}

    def load_state_dict(state):
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["optim"])

    manager = torchft.Manager(
        pg=torchft.ProcessGroupGloo(timeout=timedelta(seconds=args.pg_timeout)),
        load_state_dict=load_state_dict, state_dict=state_dict, min_replica_size=1, init_sync=False,
        rank=0, world_size=1, store_addr="127.0.0.1", store_port=store.port,
        lighthouse_addr=args.lighthouse, replica_id=args.group, hostname="127.0.0.1",
        timeout=timedelta(seconds=args.pg_timeout),
    )
    wrapper = torchft.DistributedDataParallel
    if args.hook == "patched":  # its __init__ registers self._comm_hook
        wrapper = type("TolerantDDP", (wrapper,), {"_comm_hook": staticmethod(_tolerant_hook)})
    ddp = wrapper(manager, model)
    optimizer = torchft.Optimizer(manager, inner)
    log = open(args.log, "a", buffering=1)
    Path(args.log + ".ready").touch()
    while not Path(args.go).exists():  # both groups heartbeat before the first quorum: it has both
        time.sleep(0.02)
    while manager.current_step() < (args.steps_limit or args.max_steps):
        optimizer.zero_grad()  # starts the quorum
        participants = manager.num_participants()
        step = manager.current_step()
        sampler.rank, sampler.world_size = manager.participating_rank() or 0, max(participants, 1)
        sampler.local_batch, sampler.step = BATCH // sampler.world_size, step
        x, y = sampler.next_batch()
        for group in inner.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg)
        loss = _loss(ddp, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()  # should_commit, then AdamW
        committed = manager.current_step() > step
        log.write(json.dumps({"t": time.monotonic(), "step": manager.current_step(), "committed": committed,
                              "participants": participants, "loss": round(loss.item(), 4)}) + "\n")
        if args.leave_at and committed and manager.current_step() >= args.leave_at:
            log.write(json.dumps({"t": time.monotonic(), "left": True}) + "\n")
            manager.shutdown(wait=False)
            os._exit(0)  # the stop is the process going away, as a noticed node's does
    manager.shutdown(wait=False)
    os._exit(0)


# ------------------------------------------------------------------ the bench side
def _bench_multinode():
    """bench/multinode.py as a module (this folder is off sys.path: see the top): our engine's
    trial and the bench side's small helpers, shared rather than written twice."""
    spec = importlib.util.spec_from_file_location("bench_multinode", _HERE / "multinode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MULTINODE = _bench_multinode()
free_port, wait_for = MULTINODE.free_port, MULTINODE.wait_for


def read_lines(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line being written
    return out


class Fleet:
    """A lighthouse and replica groups, each a session leader of ours, ended by its PID."""

    def __init__(self, work: Path, max_steps: int, hook: str, open_ended: bool = False) -> None:
        self.work, self.max_steps, self.hook, self.open_ended = work, max_steps, hook, open_ended
        self.env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo",
                    "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        binary = Path(sys.executable).parent / "torchft_lighthouse"
        self.lighthouse = subprocess.Popen(
            [str(binary), "--bind", f"127.0.0.1:{port}", "--min_replicas", "1"],
            stdout=subprocess.DEVNULL, stderr=(work / "lighthouse.log").open("w"), start_new_session=True)

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0
        wait_for(listening, 60, "the lighthouse")
        self.groups: dict[str, subprocess.Popen] = {}

    def start(self, group: str, leave_at: int = 0) -> float:
        limit = ["--steps-limit", str(10**6)] if self.open_ended else []
        args = [sys.executable, str(Path(__file__).resolve()), "worker", "--group", group, "--lighthouse", self.url,
                "--log", str(self.log(group)), "--go", str(self.work / "go"), "--max-steps", str(self.max_steps),
                "--leave-at", str(leave_at), "--hook", self.hook, *limit]
        started = time.monotonic()
        self.groups[group] = subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL,
                                              stderr=(self.work / f"{group}.err").open("w"), start_new_session=True)
        return started

    def log(self, group: str) -> Path:
        return self.work / f"{group}.jsonl"

    def committed(self, group: str) -> list[dict]:
        return [line for line in read_lines(self.log(group)) if line.get("committed")]

    def last_error(self, group: str) -> str:
        lines = [line for line in (self.work / f"{group}.err").read_text(errors="replace").splitlines()
                 if "Error" in line or "assert" in line]
        return lines[-1].strip()[:200] if lines else ""

    def close(self) -> None:
        for proc in self.groups.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self.lighthouse.terminate()
        self.lighthouse.wait()


def median_ms(times: list[float]) -> float | None:
    """Median time between consecutive steps: robust to the other agents' bursts on this machine."""
    intervals = [b - a for a, b in zip(times, times[1:])]
    return round(1000 * statistics.median(intervals), 1) if intervals else None


def rate(times: list[float]) -> float:
    return round((len(times) - 1) / (times[-1] - times[0]), 2) if len(times) > 1 and times[-1] > times[0] else 0.0


def torchft_trial(kind: str, at: int, max_steps: int, rng: random.Random, keep: Path | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-torchft-"))
    # The join trial trains until the bench ends it: the joiner must find the survivor still training.
    fleet = Fleet(work, max_steps, "patched" if kind == "kill-patched" else "stock", open_ended=kind == "join")
    joined: dict = {}
    t_join = float("inf")
    try:
        fleet.start("a", leave_at=at if kind in ("leave", "join") else 0)  # the group that goes away
        fleet.start("b")
        wait_for(lambda: all(Path(f"{fleet.log(g)}.ready").exists() for g in "ab"), 300, "both groups ready")
        (work / "go").touch()
        if kind.startswith("kill"):
            wait_for(lambda: any(line["step"] >= at for line in fleet.committed("a")), 600, f"step {at}")
            time.sleep(rng.uniform(0.0, 0.15))  # within the next few steps (10-40 ms each here)
            t_stop = time.monotonic()
            os.kill(fleet.groups["a"].pid, signal.SIGKILL)
        else:
            left = wait_for(lambda: [x for x in read_lines(fleet.log("a")) if x.get("left")], 600, f"a leaving at {at}")
            t_stop = left[0]["t"]
        if kind == "join":
            wait_for(lambda: any(x["step"] >= at + 30 for x in fleet.committed("b")) or fleet.groups["b"].poll() is not None,
                     300, "30 steps at 1 participant")
            t_join = fleet.start("c")
            wait_for(lambda: sum(x["participants"] == 2 for x in fleet.committed("c")) >= 20
                     or any(fleet.groups[g].poll() is not None for g in "bc"), 300, "20 steps with the joiner")
            running = {g for g, p in fleet.groups.items() if p.poll() is None}
            for proc in fleet.groups.values():  # the trial is over: end the open-ended run
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: all(p.poll() is not None for p in fleet.groups.values()), 900, "the groups to exit")
        codes = {g: p.returncode for g, p in fleet.groups.items()}
        b = fleet.committed("b")
        if kind == "join":
            c = fleet.committed("c")
            c_first = next((x for x in c if x["participants"] == 2), None)
            around = [x["t"] for x in b if t_join - 1 <= x["t"] <= (c_first["t"] + 1 if c_first else t_join + 5)]
            joined = {
                "joiner_start_to_first_step_s": round(c_first["t"] - t_join, 2) if c_first else None,
                "joiner_first_step": c_first["step"] if c_first else None,
                "survivor_step_then": max((x["step"] for x in b if x["t"] <= c_first["t"]), default=None) if c_first else None,
                "survivor_longest_step_gap_during_join_s": round(max(
                    (t2 - t1 for t1, t2 in zip(around, around[1:])), default=0.0), 2),
                "survivor_steps_per_s_with_joiner": rate([x["t"] for x in b if c_first and x["t"] > c_first["t"]][:10]),
            }
            codes = {g: "running" if g in running else code for g, code in codes.items()}  # ended by the bench
        ended = {"a"} if kind.startswith("kill") else set()
        errors = {g: fleet.last_error(g) for g, code in codes.items() if code not in (0, "running") and g not in ended}
    finally:
        fleet.close()
    # Steps at 2 participants can land just after the leaver's exit: it is their commit that let it go.
    before = [x for x in b if x["participants"] == 2 and (kind != "join" or x["t"] < t_join)]
    after = [x for x in b if x["participants"] == 1 and x["t"] > t_stop]
    result: dict = {"engine": "torchft", "trial": kind, "at_step": at, "survivor_exit": codes["b"],
                    "stopped_exit": codes["a"], "final_step": max((x["step"] for x in b), default=0)}
    if after and before:
        result.update({
            "downtime_s": round(after[0]["t"] - t_stop, 2), "gap_s": round(after[0]["t"] - before[-1]["t"], 2),
            "steps_lost": max(0, before[-1]["step"] - (after[0]["step"] - 1)),
            "last_step_before": before[-1]["step"], "first_step_after": after[0]["step"],
            "uncommitted_steps": sum(1 for x in read_lines(fleet.log("b")) if x.get("committed") is False),
        })
    result["steps_per_s_before"] = rate([x["t"] for x in before][-10:])
    result["steps_per_s_after"] = rate([x["t"] for x in after][:10])
    result["step_ms_median_before"] = median_ms([x["t"] for x in before][10:])
    result["step_ms_median_after"] = median_ms([x["t"] for x in after])
    if errors:
        result["errors"] = errors
    result.update(joined)
    if keep is not None:
        shutil.copytree(work, keep / f"torchft-{kind}-{work.name}", dirs_exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return result


def plain_trial(steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "plain", "--steps", str(steps)],
                         env=env, capture_output=True, text=True, check=True, timeout=600)
    return {"engine": "none", "trial": "plain", **json.loads(out.stdout.strip().splitlines()[-1])}


def elastic_trial(stop: str, at: int, max_steps: int, every: int, keep: Path | None) -> dict:
    result = MULTINODE.trial(stop, "other", at, max_steps, every=every, collective_timeout=60.0, keep=keep)
    return {"engine": "elastic", "trial": stop, **result}


def render(rows: list[dict], plain_ms: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"one of two participants stopped at step --at; plain loop {plain_ms} ms/step (median)")
    for column in ("engine", "trial", "downtime s", "gap s", "steps lost", "steps/s before -> after",
                   "ms/step at 2 -> 1", "at 1 / plain", "survivor exit", "notes"):
        table.add_column(column)
    for r in rows:
        exit_code = r.get("survivor_exit", r.get("exit_codes", {}).get("survivor"))
        notes = "; ".join(f"{g}: {e}" for g, e in r.get("errors", {}).items())
        if "joiner_start_to_first_step_s" in r:
            notes = (f"joiner at step {r['joiner_first_step']} (survivor {r['survivor_step_then']}) "
                     f"{r['joiner_start_to_first_step_s']} s after its start; survivor's longest step "
                     f"{r['survivor_longest_step_gap_during_join_s']} s") + (f"; {notes}" if notes else "")
        at_1 = r.get("step_ms_median_after")
        table.add_row(r["engine"], r["trial"], str(r.get("downtime_s", "-")), str(r.get("gap_s", "-")),
                      str(r.get("steps_lost", "-")),
                      f"{r.get('steps_per_s_before', 0):.1f} -> {r.get('steps_per_s_after') or 0:.1f}",
                      f"{r.get('step_ms_median_before')} -> {at_1}",
                      f"{at_1 / plain_ms:.2f}" if at_1 and plain_ms else "-", str(exit_code), notes)
    Console(width=220).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("worker")
    for flag in ("--group", "--lighthouse", "--log", "--go"):
        worker.add_argument(flag, required=True)
    worker.add_argument("--max-steps", type=int, required=True)
    worker.add_argument("--leave-at", type=int, default=0)
    worker.add_argument("--steps-limit", type=int, default=0, help="train this many (default --max-steps)")
    worker.add_argument("--hook", choices=["stock", "patched"], default="stock")
    worker.add_argument("--pg-timeout", type=float, default=60.0)
    sub.add_parser("plain").add_argument("--steps", type=int, default=200)
    parser.add_argument("--trial", action="append", choices=["leave", "kill", "kill-patched", "join"])
    parser.add_argument("--elastic", action=argparse.BooleanOptionalAction, default=True,
                        help="also run our engine's notice and kill trials (bench/multinode.py)")
    parser.add_argument("--at", type=int, default=100)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=0,
                        help="checkpoint.every_steps of our engine's run (0, as recorded: no periodic save)")
    parser.add_argument("--plain-steps", type=int, default=200)
    parser.add_argument("--kill-repeats", type=int, default=3, help="kill trials per variant (seeded moments)")
    parser.add_argument("--seed", type=int, default=SEED, help="seeds the kill moments")
    parser.add_argument("--keep", type=Path, default=None, help="copy each trial's logs here")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "torchft.json")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    if args.command == "worker":
        return worker_main(args)
    if args.command == "plain":
        return plain_main(args.steps)

    import torch
    import torchft  # noqa: F401  (fail here, not in a subprocess, when it does not import)
    from importlib.metadata import version

    print(f"seed {args.seed}; torch {torch.__version__}, torchft {version('torchft')}", flush=True)
    rng = random.Random(args.seed)
    load_start = os.getloadavg()
    plains = [plain_trial(args.plain_steps)]
    print(f"plain    {json.dumps(plains[0])}", flush=True)
    rows = []
    for kind in args.trial or ["leave", "kill", "kill-patched", "join"]:
        for _ in range(args.kill_repeats if kind.startswith("kill") else 1):
            rows.append(torchft_trial(kind, args.at, args.max_steps, rng, args.keep))
            print(f"torchft  {json.dumps(rows[-1])}", flush=True)
    for stop in (["notice", "kill"] if args.elastic else []):
        rows.append(elastic_trial(stop, args.at, args.max_steps, args.every, args.keep))
        print(f"elastic  {json.dumps(rows[-1])}", flush=True)
    plains.append(plain_trial(args.plain_steps))
    plain_ms = round(statistics.median(p["step_ms_median"] for p in plains), 1)
    render(rows, plain_ms)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "one of two participants stopped at step --at on the tiny model (d_model 32, 1 layer, global "
                "batch 4 x 32 tokens, bundled corpus, seed 1337, gloo on loopback, 1 thread per process); "
                "torchft: lighthouse + 2 replica groups of 1 process; elastic: bench/multinode.py's trial; "
                "downtime = stop -> survivor's first step with 1 participant",
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "torchft": version("torchft"),
                    "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "seed": args.seed, "plain": plains, "trials": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
