"""The `train` command end to end: real subprocesses, real files, real torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]

# A very small model so each run takes seconds on 2 cores.
SMALL = [
    "model.d_model=32", "model.n_layer=2", "train.batch_size=4", "train.seq_len=32",
    "train.max_steps=20", "train.warmup_steps=2", "train.eval_every=10", "train.eval_batches=2",
    "train.log_every=5", "train.sample_tokens=16", "train.threads=1", "checkpoint.every_steps=5",
    "spot.imds_url=off", "logging.cloudwatch=off",
]


def run_cli(args: list[str], tmp: Path, *, timeout: float = 240, env: dict | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "mamba_training", *args], cwd=tmp, capture_output=True, text=True,
        timeout=timeout, env=full_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def train_args(tmp: Path, store: str, *extra: str) -> list[str]:
    sets = [*SMALL, f"checkpoint.store={store}", f"data.cache_dir={tmp / 'data-cache'}",
            f"checkpoint.cache_dir={tmp / 'ckpt-cache'}", *extra]
    return ["train", "-c", str(REPO / "configs" / "tiny.yaml"), *[a for s in sets for a in ("--set", s)]]


def held_env(control: Path, *steps: int) -> dict[str, str]:
    """Environment that makes the trainer hold after each of `steps` (train/control.py)."""
    return {"MAMBA_TRAINING_HOLD_AT": ",".join(map(str, steps)), "MAMBA_TRAINING_CONTROL_DIR": str(control)}


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait for the trainer to write `path` (an event, with a generous timeout: never a duration)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited {proc.returncode} before {path.name}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {path.name} within {timeout} s")
        time.sleep(0.01)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def assert_one_error_line(stderr: str, culprit: str) -> None:
    """Exactly one 'error:' line, naming the culprit, last, and no traceback."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and culprit in errors[0], stderr
    assert "Traceback" not in stderr, stderr


def metrics(run: Path) -> list[dict]:
    rows = []
    for path in sorted((run / "records").glob("*/metrics.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def events(run: Path) -> list[dict]:
    rows = []
    for path in sorted((run / "records").glob("*/events.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def segment_events(run: Path) -> list[list[dict]]:
    """Each segment's events, oldest segment first."""
    return [[json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((run / "records").glob("*/events.jsonl"))]


def test_training_writes_a_final_model_transformers_loads(tmp_path: Path) -> None:
    proc = run_cli(train_args(tmp_path, "run"), tmp_path, check=True)
    run = tmp_path / "run"
    assert "validation loss" in proc.stdout and "unigram entropy" in proc.stdout
    from transformers import MambaForCausalLM

    hf = MambaForCausalLM.from_pretrained(run / "final")
    ours = final_weights(run)
    assert torch.equal(hf.backbone.embeddings.weight.detach(), ours["backbone.embeddings.weight"])
    assert (run / "loss.png").stat().st_size > 1000
    rows = metrics(run)
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert any("val_loss" in r for r in rows)
    assert list(run.glob("tensorboard/*/events.out.tfevents.*"))
    assert [e["kind"] for e in events(run)][-1] == "exit"
    start = events(run)[0]
    assert start["kind"] == "start" and 0 < start["startup_s"] < 120
    # The process ends without interpreter teardown: everything it printed still arrives, the sample last.
    tail = proc.stdout.split("sample:", 1)[1]
    assert "final model:" in proc.stdout and tail.strip(), proc.stdout


def test_same_config_twice_gives_bitwise_identical_weights(tmp_path: Path) -> None:
    run_cli(train_args(tmp_path, "a"), tmp_path, check=True)
    run_cli(train_args(tmp_path, "b"), tmp_path, check=True)
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))


def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    run_cli(train_args(tmp_path, "straight", "train.max_steps=30"), tmp_path, check=True)
    args = train_args(tmp_path, "stopped", "train.max_steps=30")
    control = tmp_path / "control"
    proc = subprocess.Popen([sys.executable, "-m", "mamba_training", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **held_env(control, 12)})
    run = tmp_path / "stopped"
    wait_for_file(control / "reached-12", proc)  # held after step 12 of 30: the stop is at 12 exactly
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err
    assert "preempted" in err.splitlines()[-1]
    exit_event = [e for e in events(run) if e["kind"] == "exit"][-1]
    assert exit_event["reason"] == "signal:SIGTERM" and exit_event["lost_steps"] == 0
    # Step 12 is not a checkpoint step (every 5): the emergency checkpoint is, and no step 13 began.
    assert exit_event["step"] == exit_event["committed_step"] == 12
    assert max(r["step"] for r in metrics(run)) == 10  # log_every=5: step 12 trained, not logged
    run_cli(args, tmp_path, check=True)
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(run))
    # The resumed segment records its start-up time, and no 'checkpoint' event for the checkpoint
    # it restored (that one is already in the first segment's events).
    resumed = segment_events(run)[-1]
    assert resumed[0]["kind"] == "resume" and 0 < resumed[0]["startup_s"] < 120
    restored = resumed[0]["step"]
    assert restored == exit_event["committed_step"]
    assert all(e["checkpoint_step"] > restored for e in resumed if e["kind"] == "checkpoint")


def test_a_stop_past_its_deadline_keeps_the_last_commit_and_the_resume_is_exact(tmp_path: Path) -> None:
    """A SIGTERM whose grace has already run out at the boundary: the emergency checkpoint would
    not fit (the step-5 commit's measured time exceeds what is left), so step 5 stays
    authoritative; the stopped step drew no batch, and the resumed run is bitwise a straight one."""
    run_cli(train_args(tmp_path, "straight"), tmp_path, check=True)
    args = train_args(tmp_path, "stopped", "spot.grace_seconds=0.000001")
    control = tmp_path / "control"
    proc = subprocess.Popen([sys.executable, "-m", "mamba_training", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **held_env(control, 7)})
    wait_for_file(control / "reached-7", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err
    assert "step 5 stays authoritative" in err
    run = tmp_path / "stopped"
    exit_event = [e for e in events(run) if e["kind"] == "exit"][-1]
    assert (exit_event["step"], exit_event["committed_step"], exit_event["lost_steps"]) == (7, 5, 2)
    run_cli(args, tmp_path, check=True)
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(run))


def test_resume_never_refuses_a_store_with_checkpoints(tmp_path: Path) -> None:
    run_cli(train_args(tmp_path, "run", "train.max_steps=5"), tmp_path, check=True)
    proc = run_cli([*train_args(tmp_path, "run", "train.max_steps=5"), "--resume", "never"], tmp_path)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "--resume auto")


def test_init_from_starts_from_the_given_weights(tmp_path: Path) -> None:
    run_cli(train_args(tmp_path, "base", "train.max_steps=30"), tmp_path, check=True)
    fresh = run_cli(train_args(tmp_path, "fresh", "train.max_steps=5"), tmp_path, check=True)
    tuned = run_cli([*train_args(tmp_path, "tuned", "train.max_steps=5"), "--init-from",
                     str(tmp_path / "base" / "final")], tmp_path, check=True)
    assert fresh.returncode == tuned.returncode == 0
    assert metrics(tmp_path / "tuned")[0]["loss"] < metrics(tmp_path / "fresh")[0]["loss"] - 0.3


@pytest.mark.parametrize(
    ("extra", "cli_tail", "culprit"),
    [
        ([], ["--config", "missing.yaml"], "missing.yaml"),
        (["data.corpus=/no/such/corpus"], [], "/no/such/corpus"),
        (["model.d_model=0"], [], "model.d_model"),
        (["train.bogus=1"], [], "train.bogus"),
        (["checkpoint.store=ftp://x/y"], [], "ftp://x/y"),
    ],
    ids=["missing-config", "missing-corpus", "bad-shape", "unknown-key", "bad-store-url"],
)
def test_bad_input_is_one_line_naming_the_culprit_and_exit_2(tmp_path: Path, extra, cli_tail, culprit) -> None:
    args = train_args(tmp_path, "run", *extra)
    if cli_tail:
        args = ["train", *cli_tail]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, culprit)


def test_init_from_a_model_of_another_shape_is_refused(tmp_path: Path) -> None:
    run_cli(train_args(tmp_path, "base", "train.max_steps=2"), tmp_path, check=True)
    proc = run_cli([*train_args(tmp_path, "other", "model.d_model=48"), "--init-from",
                    str(tmp_path / "base" / "final")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, "backbone")


def test_a_truncated_token_shard_is_refused(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    run_cli(["prepare", str(corpus), str(tmp_path / "prepared")], tmp_path, check=True)
    shard = sorted((tmp_path / "prepared").rglob("*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    proc = run_cli(train_args(tmp_path, "run", f"data.corpus={tmp_path / 'prepared'}"), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, shard.name)


def test_torchrun_two_ranks_with_gloo_trains_and_resumes_on_one(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    args = train_args(tmp_path, "ddp", "train.max_steps=10")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "mamba_training", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    assert (run / "final" / "model.safetensors").exists()
    assert [e for e in events(run) if e["kind"] == "start"][0]["world_size"] == 2
    # The same run continues on one process to step 15 (resharded from 2 ranks to 1).
    run_cli(train_args(tmp_path, "ddp", "train.max_steps=15"), tmp_path, check=True)
    assert max(r["step"] for r in metrics(run)) == 15
    assert [e for e in events(run) if e["kind"] == "resume"][-1]["world_size"] == 1


def worker_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the processes under `launcher` that carry a RANK (torchrun's workers)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue

    def under(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == launcher:
                return True
        return False

    ranks = {}
    for pid in filter(under, parents):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


def test_a_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """Rank 1 alone is signalled while both ranks are held after step 7: the boundary's all-reduce
    stops both at step 7, rank 0 commits that step once, and nobody hangs in a collective."""
    torchrun = Path(sys.executable).with_name("torchrun")
    control = tmp_path / "control"
    args = train_args(tmp_path, "ddp", "train.max_steps=20")
    proc = subprocess.Popen(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "mamba_training", *args],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **held_env(control, 7)},
    )
    wait_for_file(control / "reached-7", proc, timeout=300)
    ranks = worker_pids(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGTERM)
    _, err = proc.communicate(timeout=300)  # bounded: a rank left in a collective would hang here
    run = tmp_path / "ddp"
    (exit_event,) = [e for e in events(run) if e["kind"] == "exit"]
    assert exit_event["reason"] == "signal:peer", err[-3000:]  # rank 0 writes the records: a peer's cause
    assert exit_event["step"] == exit_event["committed_step"] == 7 and exit_event["lost_steps"] == 0
    # The checkpoint holds both ranks' RNG states, and they differ (each rank was seeded seed + rank).
    step_dir = run / "checkpoints" / "step_00000007"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    tree = json.loads((step_dir / manifest["tree"]).read_text())
    rng = tree["trainer"]["rng_ranks"]
    assert len(rng) == 2 and rng[0]["python"] != rng[1]["python"]
    # One process continues the run (another world size: its RNG is derived from seed, step, rank).
    run_cli(train_args(tmp_path, "ddp", "train.max_steps=12"), tmp_path, check=True)
    assert [e for e in events(run) if e["kind"] == "resume"][-1]["step"] == 7
