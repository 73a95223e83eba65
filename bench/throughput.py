"""Training throughput of our Mamba against transformers and mambapy (CPU, float32).

Measures tokens/s of a full training step (forward, cross-entropy, backward, AdamW step) for
  ours                     mamba_training.model.MambaLM (scan "auto": the chunked scan on CPU)
  transformers             transformers.MambaForCausalLM, its default PyTorch path
  transformers+mambapy     the same with use_mambapy=True (its parallel-scan fallback)
  mambapy                  mambapy.mamba.Mamba (pscan=True) in a small tied-embedding LM
                           (mambapy.lm cannot be imported without mamba_ssm)
at d_model 256, 4 layers, d_state 16, expand 2, vocab 256, batch 8, seq_len 256 and 1024, on
2 threads, plus ours on the small default training config (d_model 128, 4 layers, batch 16,
seq_len 128). Steps are timed round-robin (one step of each model in turn), so the load of a
shared machine falls on every model alike; we report the median and the best step.

    .venv/bin/python bench/throughput.py            # full run (the transformers default path
                                                    # needs minutes per step at seq_len 1024)
    .venv/bin/python bench/throughput.py --quick    # a smoke run: fewer steps, shorter sequences

Writes bench/results/throughput.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every model here is built from a config

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from mamba_training.model import MambaConfig, MambaLM

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Shape:
    d_model: int = 256
    n_layer: int = 4
    d_state: int = 16
    expand: int = 2
    vocab: int = 256
    batch: int = 8


@dataclass
class Result:
    impl: str
    case: str
    seq_len: int
    batch: int
    step_s: list[float] = field(default_factory=list)
    error: str | None = None
    first_step_timed: bool = False  # a slow model's warm-up step counted as a timed step

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def tok_s(self, which: str) -> float | None:
        if not self.step_s:
            return None
        t = statistics.median(self.step_s) if which == "median" else min(self.step_s)
        return self.tokens / t


# --- the models -----------------------------------------------------------------------------


def build_ours(shape: Shape) -> nn.Module:
    cfg = MambaConfig(d_model=shape.d_model, n_layer=shape.n_layer, vocab_size=shape.vocab,
                      d_state=shape.d_state, expand=shape.expand)
    return MambaLM(cfg)


def build_transformers(shape: Shape, use_mambapy: bool = False) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.MambaConfig(
        vocab_size=shape.vocab, hidden_size=shape.d_model, num_hidden_layers=shape.n_layer,
        state_size=shape.d_state, expand=shape.expand, use_mambapy=use_mambapy, use_cache=False,
    )
    return _LogitsOnly(transformers.MambaForCausalLM(cfg))


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits


class MambapyLM(nn.Module):
    """mambapy's backbone with embeddings, final RMSNorm and a tied head (what mambapy.lm adds)."""

    def __init__(self, shape: Shape):
        super().__init__()
        from mambapy.mamba import Mamba, MambaConfig as PyConfig, RMSNorm

        cfg = PyConfig(d_model=shape.d_model, n_layers=shape.n_layer, d_state=shape.d_state,
                       expand_factor=shape.expand, pscan=True)
        self.embedding = nn.Embedding(shape.vocab, shape.d_model)
        self.mamba = Mamba(cfg)
        self.norm_f = RMSNorm(shape.d_model)
        self.lm_head = nn.Linear(shape.d_model, shape.vocab, bias=False)
        self.lm_head.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm_f(self.mamba(self.embedding(ids))))


BUILDERS: dict[str, Callable[[Shape], nn.Module]] = {
    "ours": build_ours,
    "transformers": build_transformers,
    "transformers+mambapy": lambda s: build_transformers(s, use_mambapy=True),
    "mambapy": MambapyLM,
}


# --- timing ---------------------------------------------------------------------------------


class Trainee:
    def __init__(self, name: str, model: nn.Module, shape: Shape, seq_len: int, seed: int):
        self.name = name
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, shape.vocab, (shape.batch, seq_len), generator=gen)

    def step(self) -> float:
        start = time.perf_counter()
        logits = self.model(self.ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), self.ids[:, 1:].flatten())
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def run_case(case: str, impls: list[str], shape: Shape, seq_len: int, steps: int, warmup: int,
             console: Console, budget_s: float = 600.0, slow_step_s: float = 60.0) -> list[Result]:
    """Warm up each model, then time `steps` rounds, one step of each model per round.

    A model whose steps take minutes (transformers' default path at seq_len 1024) would hold
    the run for an hour: a warm-up step slower than `slow_step_s` is steady state already and
    counts as a timed step, and a model stops taking steps once its timed steps add up to
    `budget_s`. The table shows how many steps each median rests on.
    """
    results, trainees = [], []
    for name in impls:
        result = Result(impl=name, case=case, seq_len=seq_len, batch=shape.batch)
        results.append(result)
        try:
            torch.manual_seed(0)
            trainees.append((Trainee(name, BUILDERS[name](shape), shape, seq_len, seed=1), result))
        except Exception as exc:  # a peer that will not build is reported, not fatal
            result.error = f"{type(exc).__name__}: {exc}"
            console.print(f"[yellow]{name}: cannot build ({result.error})[/]")
    for trainee, result in trainees:
        for _ in range(warmup):
            t = trainee.step()
            console.print(f"  {case} L={seq_len} {trainee.name}: warm-up step {t:.2f}s")
            if t > slow_step_s:
                result.step_s.append(t)
                result.first_step_timed = True
                break
    for r in range(steps):
        ran = []
        for trainee, result in trainees:  # round-robin: load swings hit every model alike
            if len(result.step_s) >= steps or sum(result.step_s) >= budget_s:
                continue
            result.step_s.append(trainee.step())
            ran.append(result)
        if ran:
            console.print(f"  {case} L={seq_len} round {r + 1}/{steps}: "
                          + ", ".join(f"{res.impl} {res.step_s[-1]:.2f}s" for res in ran))
    return results


# --- report ---------------------------------------------------------------------------------


def render(results: list[Result], console: Console) -> None:
    table = Table(title=f"Training tokens/s (fwd+bwd+AdamW, fp32, {torch.get_num_threads()} threads)")
    for col in ("case", "L", "batch", "impl", "median tok/s", "best tok/s", "step s", "steps", "ours/this"):
        table.add_column(col, justify="right" if col not in ("case", "impl") else "left", no_wrap=True)
    for r in results:
        ours = next((o for o in results if o.impl == "ours" and o.case == r.case and o.seq_len == r.seq_len), None)
        med, best = r.tok_s("median"), r.tok_s("best")
        ratio = ours.tok_s("median") / med if ours and med and ours.tok_s("median") else None
        table.add_row(
            r.case, str(r.seq_len), str(r.batch), r.impl,
            f"{med:,.0f}" if med else (r.error or "-"), f"{best:,.0f}" if best else "-",
            f"{statistics.median(r.step_s):.3f}" if r.step_s else "-", str(len(r.step_s)),
            f"{ratio:.2f}x" if ratio and r.impl != "ours" else "",
        )
    console.print(table)


def summary(results: list[Result]) -> dict:
    out = {}
    for r in results:
        if r.impl != "ours" or not r.step_s:
            continue
        peers = [p for p in results if p.case == r.case and p.seq_len == r.seq_len and p.impl != "ours" and p.step_s]
        if peers:
            fastest = max(peers, key=lambda p: p.tok_s("median"))
            out[f"{r.case}/L{r.seq_len}"] = {
                "ours_median_tok_s": r.tok_s("median"),
                "fastest_peer": fastest.impl,
                "fastest_peer_median_tok_s": fastest.tok_s("median"),
                "speedup_vs_fastest_peer": r.tok_s("median") / fastest.tok_s("median"),
            }
    return out


def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "mambapy"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            found[pkg] = "missing"
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: seq_len 64/256, 2 timed steps, 1 warm-up")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model (default 5; 2 with --quick)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default 256 1024 (64 256 with --quick)")
    ap.add_argument("--impls", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    ap.add_argument("--budget-s", type=float, default=600.0,
                    help="stop timing a model once its timed steps add up to this (default 600)")
    ap.add_argument("--slow-step-s", type=float, default=60.0,
                    help="a warm-up step slower than this counts as a timed step (default 60)")
    ap.add_argument("--skip", nargs="*", default=[], metavar="IMPL@L",
                    help="leave a model out at one sequence length, e.g. transformers@1024 (its O(L^2) "
                         "backward needs tens of minutes per step there on a busy 2-core machine)")
    ap.add_argument("--no-tiny", action="store_true", help="skip the small default training config")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "throughput.json")
    args = ap.parse_args(argv)
    steps = args.steps or (2 if args.quick else 5)
    seq_lens = args.seq_lens or ([64, 256] if args.quick else [256, 1024])
    torch.set_num_threads(args.threads)
    console = Console(width=max(120, Console().width))
    console.print(f"threads={torch.get_num_threads()} steps={steps} warmup={args.warmup} {versions()}")

    results: list[Result] = []
    for seq_len in seq_lens:
        impls = [i for i in args.impls if f"{i}@{seq_len}" not in args.skip]
        results += run_case("bench", impls, Shape(), seq_len, steps, args.warmup, console,
                            args.budget_s, args.slow_step_s)
        results += [Result(impl=i, case="bench", seq_len=seq_len, batch=Shape().batch, error="skipped (--skip)")
                    for i in args.impls if i not in impls]
    if not args.no_tiny:
        tiny = Shape(d_model=128, n_layer=4, batch=16)
        results += run_case("tiny-default", ["ours"], tiny, 128, max(steps, 5), args.warmup, console,
                            args.budget_s, args.slow_step_s)
    render(results, console)
    speed = summary(results)
    for key, s in speed.items():
        console.print(f"{key}: ours {s['ours_median_tok_s']:,.0f} tok/s = {s['speedup_vs_fastest_peer']:.2f}x "
                      f"the fastest peer ({s['fastest_peer']}, {s['fastest_peer_median_tok_s']:,.0f} tok/s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:] if argv is None else argv,
        "threads": args.threads, "steps": steps, "warmup": args.warmup,
        "budget_s": args.budget_s, "slow_step_s": args.slow_step_s,
        "versions": versions(), "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "results": [
            {"case": r.case, "seq_len": r.seq_len, "batch": r.batch, "impl": r.impl, "tokens_per_step": r.tokens,
             "step_s": r.step_s, "first_step_timed": r.first_step_timed, "median_tok_s": r.tok_s("median"),
             "best_tok_s": r.tok_s("best"), "error": r.error}
            for r in results
        ],
        "summary": speed,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
