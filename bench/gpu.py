"""GPU benchmark: training tokens/s of ours against transformers (and mamba_ssm), and the
async-checkpoint stall against a synchronous save. `bench/gpu.sh` runs it after the GPU tests.

Throughput: a full training step (forward, cross-entropy in float32, backward, fused AdamW)
under bf16 autocast at the mamba-130m shape (d_model 768, 24 layers, vocab 50280, d_state 16,
expand 2) and seq_len 2048, for
  ours                 mamba_training.model.MambaLM, scan "auto" (mamba_ssm's kernel when it is
                       installed, else the Triton scan), and "triton" explicitly when they differ
  transformers         transformers.MambaForCausalLM, its torch path (its fast path needs mamba_ssm)
  mamba_ssm            mamba_ssm's MambaLMHeadModel, when mamba_ssm is importable
at batch 8, and at batch 1 for every model (transformers' torch path is O(L^2) in its backward:
at batch 8 one step takes far longer than the whole check may). Steps are timed with
torch.cuda.synchronize() around each; the first steps (Triton compilation, allocator warm-up)
are not timed; median and best are reported. A model that runs out of the time budget keeps
the steps it finished (or its one warm-up step, marked so).

Checkpoint stall: ours at the same shape with its AdamW state on the GPU. Async: how long the
training loop is blocked per CheckpointManager.save (the snapshot plus any wait of the next
optimizer step for the copy into pinned memory), training steps running while the save is in
flight; synchronous: torch.save of the same state dicts to local disk (the GPU->CPU copy
included). Goal: stall <= 5 % of the synchronous save.

    python bench/gpu.py                 # on a CUDA GPU; writes bench/results/gpu.json
    python bench/gpu.py --smoke         # anywhere: tiny shape, CPU if there is no GPU (bf16 autocast
                                        # on the CPU too), to check the script end to end
    python bench/gpu.py --requirements  # the packages the check brings along as wheels (Makefile: wheels)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU host reaches nothing outside: never download

FULL = {"d_model": 768, "n_layer": 24, "vocab": 50280, "seq_len": 2048, "batch": 8}
SMOKE = {"d_model": 32, "n_layer": 2, "vocab": 256, "seq_len": 64, "batch": 2}


def requirements() -> list[str]:
    """The package's runtime dependencies except torch, and the test runner, as pinned in pyproject."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = [r for r in project["dependencies"] if not r.replace(" ", "").startswith("torch")]
    dev = [r for r in project["optional-dependencies"]["dev"] if r.startswith(("pytest==", "pytest-timeout=="))]
    return runtime + dev


# --------------------------------------------------------------------------- models
def ours(shape: dict, scan: str):
    from mamba_training.model import MambaConfig, MambaLM

    cfg = MambaConfig(d_model=shape["d_model"], n_layer=shape["n_layer"], vocab_size=shape["vocab"], scan=scan)
    return MambaLM(cfg), lambda model, ids: model(ids)


def transformers_mamba(shape: dict):
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(hidden_size=shape["d_model"], num_hidden_layers=shape["n_layer"], vocab_size=shape["vocab"],
                      state_size=16, expand=2, conv_kernel=4, use_mambapy=False, use_cache=False)
    return MambaForCausalLM(cfg), lambda model, ids: model(input_ids=ids, use_cache=False).logits


def mamba_ssm_model(shape: dict):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    cfg = MambaConfig(d_model=shape["d_model"], n_layer=shape["n_layer"], vocab_size=shape["vocab"],
                      ssm_cfg={"layer": "Mamba1"}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
                      pad_vocab_size_multiple=8)
    return MambaLMHeadModel(cfg), lambda model, ids: model(ids).logits


def mamba_ssm_importable() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("mamba_ssm") is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- timing
def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_fn(model, forward: Callable, device, batch: int, shape: dict, optimizer):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, shape["vocab"], (batch, shape["seq_len"] + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = forward(model, x)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(name: str, build: Callable, shape: dict, batch: int, device, warmup: int, steps: int,
            deadline: float) -> dict[str, Any]:
    import torch

    from mamba_training.train.optim import adamw_implementation

    row: dict[str, Any] = {"impl": name, "batch": batch, "seq_len": shape["seq_len"]}
    model = optimizer = None
    try:
        torch.manual_seed(0)
        model, forward = build()
        model = model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw_implementation(device.type))
        row["parameters"] = sum(p.numel() for p in model.parameters())
        step = train_step_fn(model, forward, device, batch, shape, optimizer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, warm = [], []
        for i in range(warmup + steps):
            if time.monotonic() > deadline:
                row["cut_by_budget"] = True
                break
            start = time.perf_counter()
            step()
            synchronize(device)
            (warm if i < warmup else times).append(time.perf_counter() - start)
        if not times and warm:  # out of time before a timed step: the warm-up step is all there is
            times, row["first_step_timed"] = warm[-1:], True
        row["warmup_s"] = [round(t, 4) for t in warm]
        row["step_s"] = [round(t, 4) for t in times]
        tokens = batch * shape["seq_len"]
        if times:
            row["tokens_per_s_median"] = round(tokens / statistics.median(times), 1)
            row["tokens_per_s_best"] = round(tokens / min(times), 1)
        if device.type == "cuda":
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    except Exception as error:  # an OOM or a missing kernel is a result too: say what happened
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
    finally:
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def checkpoint_stall(shape: dict, device, workdir: Path, saves: int, deadline: float) -> dict[str, Any]:
    import torch
    from saves import sync_save_seconds  # bench/saves.py, beside this script

    from mamba_training.checkpoint import CheckpointManager, CheckpointPolicy
    from mamba_training.train.optim import adamw_implementation

    torch.manual_seed(0)
    model, forward = ours(shape, "auto")
    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw_implementation(device.type))
    step_shape = {**shape, "seq_len": min(shape["seq_len"], 512)}  # training between saves; short steps
    step = train_step_fn(model, forward, device, 1, step_shape, optimizer)
    app = {"model": model, "optimizer": optimizer}
    store = workdir / "run"
    mgr = CheckpointManager(str(store), policy=CheckpointPolicy(keep_last=1), cache_dir=workdir / "cache")
    mgr.restore(app)  # as the trainer does at start (an empty store)
    step()
    step()
    synchronize(device)
    sync = sync_save_seconds(model, optimizer, workdir)
    stalls, copies, commits, steps_during = [], [], [], []
    for i in range(saves):
        if time.monotonic() > deadline and stalls:
            break
        mgr.save(i + 1, 0, app)
        n = 0
        while mgr.in_flight():  # keep training while the save runs, as the trainer does
            step()
            n += 1
        synchronize(device)
        commit = mgr.flush()
        stalls.append(commit.stall_seconds)
        copies.append(commit.copy_seconds)
        commits.append(commit.seconds)
        steps_during.append(n)
    mgr.close()
    shutil.rmtree(store, ignore_errors=True)
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                       if isinstance(v, torch.Tensor))
    steady = stalls[1:] or stalls  # the first save may still find the pinned buffer being allocated
    sync_median = statistics.median(sync)
    return {
        "parameters": sum(p.numel() for p in model.parameters()), "state_bytes": state_bytes,
        "sync_torch_save_s": {"median": round(sync_median, 3), "min": round(min(sync), 3)},
        "async_stall_s": [round(x, 4) for x in stalls], "background_copy_s": [round(x, 4) for x in copies],
        "async_commit_s": [round(x, 3) for x in commits], "train_steps_during_save": steps_during,
        "stall_pct_of_sync": round(100 * statistics.median(steady) / sync_median, 2),
        "stall_pct_of_sync_first_save": round(100 * stalls[0] / sync_median, 2),
    }


# --------------------------------------------------------------------------- report
def environment(device) -> dict[str, Any]:
    import torch

    from mamba_training.model.scan import resolve_scan_name, triton_importable

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "device": str(device), "mamba_ssm": mamba_ssm_importable(),
                           "triton": triton_importable(), "scan_auto": resolve_scan_name("auto", device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if env["triton"]:
        import triton

        env["triton_version"] = triton.__version__
    return env


def ratio(a: dict | None, b: dict | None) -> float | None:
    if not a or not b or "tokens_per_s_median" not in a or "tokens_per_s_median" not in b:
        return None
    return round(a["tokens_per_s_median"] / b["tokens_per_s_median"], 3)


def find(rows: list[dict], impl: str, batch: int) -> dict | None:
    return next((r for r in rows if r["impl"] == impl and r["batch"] == batch), None)


def goals(rows: list[dict], stall: dict | None, batch: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    vs_ssm = ratio(find(rows, "ours", batch), find(rows, "mamba_ssm", batch))
    vs_hf = ratio(find(rows, "ours", 1), find(rows, "transformers", 1))
    out["ours_vs_mamba_ssm"] = vs_ssm
    out["ours_vs_transformers_batch1"] = vs_hf
    if vs_ssm is not None:
        out["throughput_goal"], out["throughput_met"] = ">= 0.95x mamba_ssm", vs_ssm >= 0.95
    elif vs_hf is not None:
        out["throughput_goal"], out["throughput_met"] = ">= 3x transformers (mamba_ssm absent)", vs_hf >= 3.0
    if stall:
        out["stall_goal"], out["stall_met"] = "<= 5 % of a synchronous save", stall["stall_pct_of_sync"] <= 5.0
    return out


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    shape = ", ".join(f"{k} {v}" for k, v in result["shape"].items())
    table = Table(title=f"training tokens/s, bf16 autocast, {shape}, on {result['environment'].get('gpu', 'cpu')}")
    for col in ("impl", "scan", "batch", "seq_len", "tok/s median", "tok/s best", "steps", "peak GiB", "note"):
        table.add_column(col)
    for r in result["throughput"]:
        note = r.get("error") or ("warm-up step only" if r.get("first_step_timed") else "")
        note = note or ("budget cut" if r.get("cut_by_budget") else "")
        table.add_row(r["impl"], r.get("scan", ""), str(r["batch"]), str(r["seq_len"]),
                      str(r.get("tokens_per_s_median", "-")), str(r.get("tokens_per_s_best", "-")),
                      str(len(r.get("step_s", []))), str(r.get("peak_memory_gib", "-")), note)
    console = Console(width=150)
    console.print(table)
    if result.get("checkpoint"):
        c = result["checkpoint"]
        console.print(f"checkpoint: async stall {c['async_stall_s']} s vs synchronous torch.save "
                      f"{c['sync_torch_save_s']['median']} s -> {c['stall_pct_of_sync']} % (goal <= 5 %)")
    console.print(f"goals: {json.dumps(result['goals'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shape, any device (CPU without a GPU)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget for all measurements")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model at the large batch")
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench/results/gpu.json (--smoke: gpu-smoke.json, not kept in git)")
    parser.add_argument("--requirements", action="store_true", help="print the wheels the check needs and exit")
    args = parser.parse_args()
    if args.requirements:
        print("\n".join(requirements()))
        return

    import torch

    started = time.monotonic()
    deadline = started + args.budget_s
    shape = SMOKE if args.smoke else FULL
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA GPU here; run it on a GPU, or use --smoke")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    env = environment(device)
    big, warmup, steps = shape["batch"], 2, args.steps

    def left(share: float) -> float:  # a deadline for the next measurement: a share of what is left
        now = time.monotonic()
        return now + max(0.0, deadline - now) * share

    rows: list[dict] = []
    result: dict[str, Any] = {
        "what": "training tokens/s (forward, float32 cross-entropy, backward, fused AdamW) under bf16 autocast; "
                "checkpoint stall per async save vs a synchronous torch.save",
        "how": "torch.cuda.synchronize around each step; warm-up steps untimed; median and best of the timed steps",
        "smoke": args.smoke, "shape": dict(shape), "environment": env, "throughput": rows, "checkpoint": None,
    }
    out = args.out or REPO / "bench" / "results" / ("gpu-smoke.json" if args.smoke else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every measurement: a run killed at its time limit keeps what it measured
        result["goals"] = goals(rows, result["checkpoint"], big)
        result["wall_s"] = round(time.monotonic() - started, 1)
        out.write_text(json.dumps(result, indent=2) + "\n")

    scans = [("ours", "auto")]
    if device.type == "cuda" and env["scan_auto"] != "triton" and env["triton"]:
        scans.append(("ours-triton", "triton"))
    for name, scan in scans:
        for batch, n in ((big, steps), (1, 3)):
            row = measure(name, lambda: ours(shape, scan), shape, batch, device, warmup, n, left(0.25))
            row["scan"] = env["scan_auto"] if scan == "auto" else scan
            rows.append(row)
            save()
    if env["mamba_ssm"]:
        for batch, n in ((big, steps), (1, 3)):
            rows.append(measure("mamba_ssm", lambda: mamba_ssm_model(shape), shape, batch, device, warmup, n,
                                left(0.25)))
            save()
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        try:
            result["checkpoint"] = checkpoint_stall(shape, device, Path(tmp), saves=4, deadline=left(0.4))
        except Exception as error:
            result["checkpoint_error"] = f"{type(error).__name__}: {error}"
    save()
    if env["transformers"]:  # last: its torch path is slow, and takes what time remains
        row = measure("transformers", lambda: transformers_mamba(shape), shape, 1, device, 1, 2, left(1.0))
        row["scan"] = "torch path"
        rows.append(row)
        save()
    print_table(result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
