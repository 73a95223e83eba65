"""Checkpoint benchmark: training stall per async save, save-to-durable on S3, resume time.

(a) stall    for models of ~10M, 100M and 350M parameters with AdamW state: how long the training
             loop is blocked per async save (save() plus any wait of the next optimizer step for
             the background copy), against a synchronous torch.save of the same state dicts to
             local disk. Goal: stall <= 5 % of the synchronous save.
(b) durable  time from save()+flush() to latest.json committed in S3 (a moto server on loopback)
             against a plain s3transfer upload (boto3 upload_file, same part size and concurrency)
             of the same bytes to the same endpoint. Goal: <= 1.2x.
(c) resume   a new process, empty cache: process start -> first training step done, with the
             checkpoint downloaded from S3, verified and restored.

The model is a stack of Linear layers (parameter count is what checkpoints care about); each
training step is forward + backward + AdamW on a small batch. Timings on shared CPUs swing:
medians and minimums over repeats are reported.

    .venv/bin/python bench/checkpoint.py                 # 10M, 100M, 350M
    .venv/bin/python bench/checkpoint.py --sizes 10M     # quick

Writes bench/results/checkpoint.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {"10M": (1024, 10), "100M": (2048, 24), "350M": (4096, 21)}  # (width, layers)


def build(size: str, seed: int = 0):
    import torch
    from torch import nn

    width, layers = SIZES[size]
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer


def step(model, optimizer, batch: int = 4) -> None:
    import torch

    width = model[0].in_features
    loss = model(torch.randn(batch, width)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- (a) stall
def bench_stall(size: str, workdir: Path, saves: int) -> dict:
    from saves import sync_save_seconds  # bench/saves.py, beside this script

    from mamba_training.checkpoint import CheckpointManager, CheckpointPolicy

    model, optimizer = build(size)
    store = workdir / f"run-{size}"
    mgr = CheckpointManager(str(store), policy=CheckpointPolicy(keep_last=1), cache_dir=workdir / "cache")
    app = {"model": model, "optimizer": optimizer}
    mgr.restore(app)  # as the trainer does at start (an empty store): the save buffer is allocated after a step
    step(model, optimizer)
    step_times = []
    for _ in range(2):
        start = time.perf_counter()
        step(model, optimizer)
        step_times.append(time.perf_counter() - start)

    sync = sync_save_seconds(model, optimizer, workdir)

    stalls, calls, commits, copies = [], [], [], []
    for i in range(saves):
        start = time.perf_counter()
        mgr.save(i + 1, 0, app)
        calls.append(time.perf_counter() - start)
        while mgr.in_flight():  # keep training while the save runs, as the trainer does
            step(model, optimizer)
        commit = mgr.flush()
        stalls.append(commit.stall_seconds)
        copies.append(commit.copy_seconds)
        commits.append(commit.seconds)
    mgr.close()
    shutil.rmtree(store, ignore_errors=True)
    steady = stalls[1:] or stalls  # the first save may still find the buffer being allocated
    return {
        "size": size, "parameters": params(model), "state_bytes": params(model) * 4 * 3,
        "train_step_s": round(statistics.median(step_times), 4),
        "sync_torch_save_s": {"median": round(statistics.median(sync), 3), "min": round(min(sync), 3)},
        "async_save_call_s": [round(x, 4) for x in calls],
        "async_stall_s": [round(x, 4) for x in stalls],
        "async_commit_s": [round(x, 3) for x in commits],
        # A loop whose forward+backward is shorter than this copy waits for the rest of it:
        "background_copy_s": [round(x, 4) for x in copies],
        "copy_pct_of_sync": round(100 * statistics.median(copies[1:] or copies) / statistics.median(sync), 2),
        "stall_pct_of_sync": round(100 * statistics.median(steady) / statistics.median(sync), 2),
        "stall_pct_of_sync_first_save": round(100 * stalls[0] / statistics.median(sync), 2),
    }


# --------------------------------------------------------------------------- (b) durable, (c) resume
def start_moto() -> tuple[subprocess.Popen, str]:
    from tests.conftest import start_moto as start

    return start()


def bench_durable(size: str, workdir: Path, repeats: int) -> dict:
    """Ours and the plain upload alternate on one bucket, so both see the same (noisy) machine.

    A first save warms up (allocates the reusable serialization buffer), as the periodic saves
    before an emergency flush do in training.
    """
    from boto3.s3.transfer import TransferConfig

    from mamba_training.aws.session import client
    from mamba_training.checkpoint import CheckpointManager, CheckpointPolicy, S3Store, read_latest

    model, optimizer = build(size)
    step(model, optimizer)
    app = {"model": model, "optimizer": optimizer}
    s3 = client("s3")
    bucket = f"bench-{size.lower()}"
    s3.create_bucket(Bucket=bucket)
    store = S3Store(bucket, "run")
    mgr = CheckpointManager(store, policy=CheckpointPolicy(keep_last=1), cache_dir=workdir / "cache")
    mgr.save(1, 0, app)
    mgr.flush()
    manifest = json.loads(store.get_bytes("checkpoints/step_00000001/manifest.json"))
    files = []
    for name in manifest["files"]:
        files.append(workdir / name)
        store.get_file(f"checkpoints/step_00000001/{name}", files[-1])
    config = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, max_concurrency=8)
    ours, flush_only, plain = [], [], []
    for i in range(repeats):
        while mgr.in_flight():  # the previous save's retention; in training it runs during the steps between saves
            time.sleep(0.01)
        start = time.perf_counter()
        mgr.save(i + 2, 0, app)
        flushed = time.perf_counter()
        commit = mgr.flush()
        done = time.perf_counter()
        assert read_latest(store)["step"] == i + 2 and commit.step == i + 2
        ours.append(done - start)
        flush_only.append(done - flushed)
        start = time.perf_counter()
        for local in files:  # the same bytes, uploaded the plain way: files, boto3 upload_file (s3transfer)
            s3.upload_file(str(local), bucket, f"plain/{local.name}", Config=config)
        plain.append(time.perf_counter() - start)
    mgr.close()
    for local in files:
        local.unlink()
    total = int(sum(m["size"] for m in manifest["files"].values()))
    return {
        "size": size, "bytes": total,
        "save_flush_to_committed_s": [round(x, 3) for x in ours],
        "flush_to_committed_s": [round(x, 3) for x in flush_only],
        "plain_s3transfer_upload_s": [round(x, 3) for x in plain],
        "ratio_median": round(statistics.median(ours) / statistics.median(plain), 3),
        "ratio_min": round(min(ours) / min(plain), 3),
    }


RESUME_CHILD = """
import sys, time, json
t0 = float(sys.argv[1])
sys.path.insert(0, sys.argv[4])
from bench.checkpoint import build, step
from mamba_training.checkpoint import CheckpointManager
t_import = time.time()
model, optimizer = build(sys.argv[2])
t_build = time.time()
info = CheckpointManager(sys.argv[3], cache_dir=sys.argv[5]).restore({"model": model, "optimizer": optimizer})
t_restore = time.time()
step(model, optimizer)
t_step = time.time()
print(json.dumps({"step": info.step, "import_s": t_import - t0, "build_s": t_build - t_import,
                  "restore_s": t_restore - t_build, "first_step_s": t_step - t_restore, "total_s": t_step - t0}))
"""


def bench_resume(size: str, workdir: Path, repeats: int) -> dict:
    from mamba_training.aws.session import client
    from mamba_training.checkpoint import CheckpointManager, CheckpointPolicy, S3Store

    model, optimizer = build(size)
    step(model, optimizer)
    bucket = f"resume-{size.lower()}"
    client("s3").create_bucket(Bucket=bucket)
    mgr = CheckpointManager(S3Store(bucket, "run"), policy=CheckpointPolicy(keep_last=1), cache_dir=workdir / "c")
    mgr.save(1, 0, {"model": model, "optimizer": optimizer})
    mgr.flush()
    mgr.close()
    del model, optimizer
    runs = []
    for i in range(repeats):
        cache = workdir / f"resume-cache-{i}"  # empty: a new machine
        start = time.time()
        out = subprocess.run([sys.executable, "-c", RESUME_CHILD, str(start), size, f"s3://{bucket}/run",
                              str(REPO), str(cache)], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        shutil.rmtree(cache, ignore_errors=True)
    # The raw transfer the restore cannot beat: the same files with s3transfer's download_file and the
    # store's transfer settings (16 MiB ranged GETs, 8 at a time). moto answers every ranged GET by
    # copying the whole object, so on moto this dominates; on S3 ranged GETs are the fast path.
    store = S3Store(bucket, "run")
    manifest = json.loads(store.get_bytes("checkpoints/step_00000001/manifest.json"))
    plain = []
    for i in range(repeats):
        start = time.perf_counter()
        for name in manifest["files"]:
            client("s3").download_file(bucket, f"run/checkpoints/step_00000001/{name}", str(workdir / name),
                                       Config=store._transfer)
        plain.append(time.perf_counter() - start)
        for name in manifest["files"]:
            (workdir / name).unlink()
    return {"size": size, "runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in runs],
            "total_s_median": round(statistics.median(r["total_s"] for r in runs), 3),
            "plain_s3transfer_download_s": [round(x, 3) for x in plain],
            "restore_over_plain_download": round(statistics.median(r["restore_s"] for r in runs)
                                                 / statistics.median(plain), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10M,100M,350M")
    parser.add_argument("--durable-sizes", default="10M,100M")
    parser.add_argument("--resume-size", default="100M")
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--durable-repeats", default="10M:5,100M:2,350M:1", help="size:repeats for (b)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "checkpoint.json")
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    result: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "python": platform.python_version()},
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        result["stall"] = []
        for size in [s for s in args.sizes.split(",") if s]:
            row = bench_stall(size, work, args.saves)
            result["stall"].append(row)
            print(f"stall   {size:>5}: sync torch.save {row['sync_torch_save_s']['median']:.3f}s, async stall "
                  f"{row['async_stall_s']} -> {row['stall_pct_of_sync']}% of sync (train step {row['train_step_s']}s)",
                  flush=True)
        moto, url = start_moto()
        os.environ["AWS_ENDPOINT_URL"] = url
        try:
            result["durable"] = []
            for size in [s for s in args.durable_sizes.split(",") if s]:
                reps = dict(x.split(":") for x in args.durable_repeats.split(",")).get(size, args.repeats)
                row = bench_durable(size, work, int(reps))
                result["durable"].append(row)
                print(f"durable {size:>5}: save+flush {row['save_flush_to_committed_s']}s vs plain upload "
                      f"{row['plain_s3transfer_upload_s']}s -> {row['ratio_median']}x", flush=True)
            if args.resume_size:
                row = bench_resume(args.resume_size, work, args.repeats)
                result["resume"] = row
                print(f"resume  {args.resume_size:>5}: process start -> first step {row['total_s_median']}s "
                      f"({row['runs'][0]}); plain download {row['plain_s3transfer_download_s']}s", flush=True)
        finally:
            moto.terminate()
            moto.wait(timeout=10)
    result["goals"] = {
        "stall_le_5pct_of_sync": all(r["stall_pct_of_sync"] <= 5 for r in result["stall"]),
        "durable_le_1_2x": all(r["ratio_median"] <= 1.2 for r in result.get("durable", [])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
