"""The trainer: one orchestrator that follows a step from data to optimizer, and owns the stop path.

It wires the components together — data sampler, model, AdamW + schedule, checkpoint manager,
spot watcher, metric sinks, cost ledger — and knows none of their insides. Everything that must
survive a restart is Stateful (state_dict / load_state_dict) and handed to the checkpoint manager.

Stop path (DESIGN.md, "Spot protocol"): an interruption notice, a terminating lifecycle state,
SIGTERM or SIGINT sets a flag; at the next step boundary (or between micro-batches when the
deadline is near) the trainer commits an emergency checkpoint, records why, and raises Preempted.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from mamba_training.checkpoint import CheckpointManager, CheckpointPolicy
from mamba_training.config import Config
from mamba_training.data import BatchSampler, TokenDataset, eval_batches, load_tokenizer, resolve_corpus
from mamba_training.errors import EXIT_PREEMPTED, Preempted, UsageError
from mamba_training.logging_setup import add_json_log
from mamba_training.model import MambaConfig, MambaLM, load_hf_weights, save_hf
from mamba_training.train import distributed, startup
from mamba_training.train.metrics import CloudWatchSink, Sinks, TensorBoardSink
from mamba_training.train.optim import build_optimizer, build_scheduler
from mamba_training.train.records import LEDGER, LOG, RecordWriter, new_segment_id, read_run

log = logging.getLogger(__name__)

# Stop codes, all-reduced with MAX so every rank takes the same decision at a step boundary.
_CONTINUE, _EARLY_SAVE, _STOP = 0.0, 1.0, 2.0
DEFAULT_NOTICE_SECONDS = 120.0


@dataclass
class TrainResult:
    status: str  # completed | preempted | budget
    step: int
    tokens_seen: int
    run_dir: Path
    store: str
    final_dir: Path | None = None
    val_loss: float | None = None
    unigram_entropy: float | None = None
    sample: str | None = None
    loss_plot: Path | None = None
    reason: str | None = None
    notice_to_durable_s: float | None = None
    lost_steps: int = 0
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    resumed_from: int | None = None


@dataclass
class _StopRequest:
    reason: str  # interruption:<action> | lifecycle | signal:SIGTERM | budget
    received: float  # time.monotonic() when we learned of it
    deadline: float  # time.monotonic() by which the state must be durable


class TrainState:
    """Step and token counters plus every RNG state: the trainer's own Stateful."""

    def __init__(self, device: torch.device) -> None:
        self.step = 0
        self.tokens_seen = 0
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        py_state = random.getstate()
        np_state = np.random.get_state()
        state: dict[str, Any] = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
            "rng_numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "rng_torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["rng_cuda"] = {str(i): s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        version, internal, gauss = state["rng_python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["rng_numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["rng_torch"].cpu())
        if torch.cuda.is_available() and "rng_cuda" in state:
            cuda = state["rng_cuda"]
            torch.cuda.set_rng_state_all([cuda[k].cpu() for k in sorted(cuda, key=int)])


def local_run_dir(store: str, cache_dir: str) -> Path:
    """Where this process keeps the run's files: the store itself when local, a cache for S3."""
    if store.startswith("s3://"):
        return Path(cache_dir) / "runs" / store[len("s3://"):].strip("/")
    if store.startswith("file://"):
        return Path(store[len("file://"):])
    return Path(store)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(
        self,
        config: Config,
        *,
        resume: str = "auto",
        init_from: str | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        transfer_progress: Callable[[str, int], Callable[[int], None]] | None = None,
    ) -> None:
        if resume not in ("auto", "never"):
            raise UsageError(f"--resume must be 'auto' or 'never' (got {resume!r})")
        self.config = config
        self.resume = resume
        self.init_from = init_from
        self.on_progress = on_progress or (lambda _: None)
        self.transfer_progress = transfer_progress  # draws the checkpoint download on resume
        self._stop: _StopRequest | None = None
        self._early_save = False
        self._signals_seen = 0
        self._last_save_seconds = 0.0
        self._interruptions = 0

    # ----------------------------------------------------------------- set-up
    def _setup(self) -> None:
        cfg = self.config
        self.dist = distributed.setup(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed + self.dist.rank)
        self.segment = new_segment_id()
        self.run_dir = local_run_dir(cfg.checkpoint.store, cfg.checkpoint.cache_dir)
        self.records = RecordWriter(self.run_dir, self.segment) if self.dist.is_main else None
        self._log_handler = add_json_log(self.run_dir / "records" / self.segment / LOG) if self.dist.is_main else None

        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if not self.dist.is_main:
            distributed.barrier(self.dist)  # rank 0 prepares the corpus once
        prepared = resolve_corpus(cfg.data.corpus, cfg.data.tokenizer, cfg.data.val_fraction, cfg.data.cache_dir,
                                  dtype=cfg.data.shard_dtype)
        if self.dist.is_main:
            distributed.barrier(self.dist)
        self.train_data = TokenDataset(prepared, "train")
        self.val_data = TokenDataset(prepared, "val")

        vocab = self.tokenizer.vocab_size if cfg.model.vocab_size == "auto" else cfg.model.vocab_size
        self.model_config = MambaConfig(
            d_model=cfg.model.d_model,
            n_layer=cfg.model.n_layer,
            vocab_size=vocab,
            d_state=cfg.model.d_state,
            d_conv=cfg.model.d_conv,
            expand=cfg.model.expand,
            dt_rank=cfg.model.dt_rank,
            pad_vocab_size_multiple=cfg.model.pad_vocab_size_multiple,
            layer_norm_epsilon=cfg.model.layer_norm_epsilon,
            scan=cfg.model.scan,
        )
        self.model_config.validate()
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.model = MambaLM(self.model_config).to(self.dist.device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.sampler = BatchSampler(
            self.train_data, cfg.train.seq_len, cfg.train.batch_size, cfg.train.seed,
            rank=self.dist.rank, world_size=self.dist.world_size,
        )
        self.state = TrainState(self.dist.device)
        self.checkpoints = CheckpointManager(
            cfg.checkpoint.store,
            policy=CheckpointPolicy(
                every_steps=cfg.checkpoint.every_steps,
                every_minutes=cfg.checkpoint.every_minutes,
                keep_last=cfg.checkpoint.keep_last,
                keep_every=cfg.checkpoint.keep_every,
            ),
            config=cfg.to_dict(),
            config_hash=cfg.hash("model"),
            cache_dir=cfg.checkpoint.cache_dir,
            writer_id=self.segment,
            async_save=cfg.checkpoint.async_save,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.amp = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.dist.device.type == "cuda" and cfg.train.amp in ("auto", "bf16")
            else nullcontext()
        )

    def _app_state(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "sampler": self.sampler,
            "trainer": self.state,
        }

    def _restore_or_init(self) -> int | None:
        """Continue from the newest committed checkpoint, else start from --init-from or scratch."""
        info = None
        if self.resume == "auto":
            self.checkpoints.progress = self.transfer_progress if self.dist.is_main else None
            try:
                info = self.checkpoints.restore(self._app_state())
            finally:
                self.checkpoints.progress = None  # background uploads draw no bars over training
        else:
            existing = self.checkpoints.last_commit or self.checkpoints.latest()
            if existing is not None:
                raise UsageError(
                    f"checkpoint store {self.config.checkpoint.store} already holds checkpoint step "
                    f"{existing.step}; use --resume auto or another checkpoint.store"
                )
        if info is not None:
            self._recorded_commit = info.step  # already in the run's events: no new 'checkpoint' event
            log.info("resumed from step %d (%s)", info.step, info.path if hasattr(info, "path") else "store")
            if self.init_from:
                log.warning("--init-from %s ignored: the run resumes from its own checkpoint", self.init_from)
            return info.step
        if self.init_from:
            load_hf_weights(self.model, self.init_from)
            log.info("initialised weights from %s", self.init_from)
        return None

    # ----------------------------------------------------------------- stop signals
    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals_seen += 1
        if self._signals_seen > 1 and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out now
        if self._stop is None:
            now = time.monotonic()
            name = signal.Signals(signum).name
            self._stop = _StopRequest(f"signal:{name}", now, now + self.config.spot.grace_seconds)

    def _poll_spot(self) -> None:
        if self.watcher is None:
            return
        from mamba_training.spot import Interruption, LifecycleTerminating, Rebalance

        for event in self.watcher.poll():
            if isinstance(event, Interruption):
                self._interruptions += 1
                left = event.seconds_left()
                received = event.received_monotonic
                self._record_event("interruption", action=event.action, notice_time=str(event.time),
                                   seconds_left=round(left, 1), malformed=event.malformed)
                if self._stop is None:
                    deadline = received + max(0.0, left) if left > 0 else received + DEFAULT_NOTICE_SECONDS
                    self._stop = _StopRequest(f"interruption:{event.action}", received, deadline)
            elif isinstance(event, LifecycleTerminating):
                self._record_event("lifecycle", state=event.state)
                if self._stop is None:
                    received = event.received_monotonic
                    self._stop = _StopRequest("lifecycle:terminating", received, received + self.config.spot.grace_seconds)
            elif isinstance(event, Rebalance):
                self._record_event("rebalance", notice_time=str(event.notice_time))
                if self.config.spot.rebalance_checkpoint:
                    self._early_save = True

    def _stop_code(self) -> float:
        self._poll_spot()
        code = _STOP if self._stop else (_EARLY_SAVE if self._early_save else _CONTINUE)
        return distributed.all_reduce_max(code, self.dist)

    # ----------------------------------------------------------------- records
    def _record_event(self, kind: str, **fields: Any) -> None:
        if self.records is not None:
            self.records.event(kind, step=self.state.step, **fields)
        log.info("event %s at step %d %s", kind, self.state.step, fields or "")

    def _upload_records(self) -> None:
        if self.records is None:
            return
        if self.ledger is not None:
            self.ledger.update(self.state.tokens_seen)
        try:
            self.checkpoints.upload_dir(self.records.dir, self.records.prefix)
        except Exception as error:  # records are nice to have; the checkpoint is what matters
            log.warning("uploading run records failed: %s", error)

    # ----------------------------------------------------------------- steps
    def _train_step(self) -> float | None:
        """One optimizer step over grad_accum micro-batches; None if abandoned for a near deadline."""
        cfg = self.config.train
        self.model.train()
        x, y = self.sampler.next_batch()
        x, y = x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)
        micro = cfg.grad_accum
        xs, ys = x.chunk(micro), y.chunk(micro)
        total = 0.0
        for i, (mx, my) in enumerate(zip(xs, ys)):
            if self._deadline_near():
                self.optimizer.zero_grad(set_to_none=True)
                return None
            last = i == micro - 1
            sync = nullcontext() if last or not isinstance(self.model, DDP) else self.model.no_sync()
            with sync, self.amp:
                logits = self.model(mx)
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), my.reshape(-1))
            (loss / micro).backward()
            total += loss.item() / micro
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total

    def _deadline_near(self) -> bool:
        """True when finishing this step would leave too little time to make the state durable."""
        if self._stop is None:
            return False
        margin = max(5.0, 2 * self._last_save_seconds)
        return time.monotonic() > self._stop.deadline - margin

    @torch.no_grad()
    def _evaluate(self) -> float:
        cfg = self.config.train
        model = self.model.module if isinstance(self.model, DDP) else self.model
        model.eval()
        per_rank = max(1, cfg.batch_size // self.dist.world_size)
        losses = []
        for x, y in self._val_batches[: cfg.eval_batches]:
            x, y = x[:per_rank].to(self.dist.device), y[:per_rank].to(self.dist.device)
            with self.amp:
                logits = model(x)
            losses.append(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1)).item())
        return float(np.mean(losses))

    def _save(self, blocking: bool = False, upload_records: bool = True) -> None:
        start = time.monotonic()
        self.checkpoints.save(self.state.step, self.state.tokens_seen, self._app_state())
        if blocking or not self.config.checkpoint.async_save:
            self.checkpoints.flush()
            self._last_save_seconds = time.monotonic() - start
            self._after_commit(upload_records)

    def _after_commit(self, upload_records: bool = True) -> None:
        """Record a new commit in the run's events; upload the records with it unless the caller
        (an ending, which uploads them once after its exit record) says not to."""
        commit = self.checkpoints.last_commit
        if commit is not None and commit.step != getattr(self, "_recorded_commit", None):
            self._recorded_commit = commit.step
            self._record_event("checkpoint", checkpoint_step=commit.step,
                               seconds=round(getattr(commit, "seconds", self._last_save_seconds), 3))
            if upload_records:
                self._upload_records()

    # ----------------------------------------------------------------- run
    def run(self) -> TrainResult:
        self._setup()
        previous_handlers = self._install_signal_handlers()
        try:
            return self._run()
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            if getattr(self, "watcher", None) is not None:
                self.watcher.stop()
            if getattr(self, "ledger", None) is not None:
                self.ledger.close(self.state.tokens_seen)
            self.checkpoints.close()
            if getattr(self, "sinks", None) is not None:
                self.sinks.close()
            if self._log_handler is not None:
                logging.getLogger("mamba_training").removeHandler(self._log_handler)
                self._log_handler.close()
            distributed.teardown()

    def _start_services(self) -> None:
        from mamba_training.spot import make_watcher, resolve_imds_url

        cfg = self.config
        on_ec2 = cfg.spot.imds_url == "auto" and resolve_imds_url("auto") is not None
        self._on_ec2 = on_ec2
        # One watcher per instance: the notice is per machine, and the stop decision is all-reduced.
        self.watcher = make_watcher(cfg.spot.imds_url, cfg.spot.poll_seconds) if self.dist.local_rank == 0 else None
        if self.watcher is not None:
            self.watcher.start()
        sinks: list[Any] = []
        if self.dist.is_main and cfg.logging.tensorboard:
            sinks.append(TensorBoardSink(self.run_dir / "tensorboard" / self.segment))
        if self.dist.is_main and (cfg.logging.cloudwatch == "on" or (cfg.logging.cloudwatch == "auto" and on_ec2)):
            sinks.append(CloudWatchSink(cfg.aws.metrics_namespace, cfg.aws.project, cfg.aws.environment,
                                        self._run_name(), cfg.aws.region, cfg.aws.profile))
        self.sinks = Sinks(sinks)
        self.ledger = self._open_ledger() if self.dist.is_main else None

    def _run_name(self) -> str:
        return self.config.checkpoint.store.rstrip("/").rsplit("/", 1)[-1]

    def _open_ledger(self):
        from mamba_training.aws.cost import Ledger, price_in_force

        info = self.watcher.instance_info() if self.watcher is not None else {}
        itype = info.get("instance_type") or "local"
        az = info.get("availability_zone") or "local"
        lifecycle = info.get("lifecycle") or ("local" if itype == "local" else "on-demand")
        region = self.config.aws.region or (az[:-1] if az != "local" else None)
        try:  # off EC2 (an emulator rehearsal) the tables price the run: no AWS call, no credentials
            price, on_demand, source = price_in_force(itype, az, lifecycle, region, self.config.aws.profile,
                                                      query_aws=self._on_ec2)
        except Exception as error:
            log.warning("no price for %s (%s): cost counts as 0", itype, error)
            price, on_demand, source = 0.0, 0.0, "unknown"
        log.info("cost ledger: %s %s %s at $%.4f/h (%s)", itype, az, lifecycle, price, source)
        # Earlier segments' cost is first needed at the first metrics line: read it meanwhile.
        self._prior_cost_reader = threading.Thread(target=self._read_prior_cost, name="prior-cost", daemon=True)
        self._prior_cost_reader.start()
        return Ledger.start(self.records.dir / LEDGER, itype, az, lifecycle, region, price, on_demand,
                            tokens_at_start=self.state.tokens_seen)

    def _read_prior_cost(self) -> None:
        try:
            ledgers = read_run(self.config.checkpoint.store, only=(LEDGER,)).ledgers
            self._prior_cost_value = sum(float(l.get("cost_usd", 0.0)) for l in ledgers
                                         if l.get("segment") != self.segment)
        except Exception as error:  # the ledger of this segment still counts; say what is missing
            log.warning("could not read the cost of earlier segments (%s): cost_usd counts this one only", error)

    @property
    def _prior_cost(self) -> float:
        """What the run's earlier segments cost (0 until known, or if unreadable)."""
        reader = getattr(self, "_prior_cost_reader", None)
        if reader is not None:
            reader.join()
        return getattr(self, "_prior_cost_value", 0.0)

    def _write_config(self) -> None:
        path = self.run_dir / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        if self.config.checkpoint.store.startswith("s3://"):
            self.checkpoints.upload_run_file("config.yaml", path)

    def _run(self) -> TrainResult:
        cfg = self.config
        resumed_from = self._restore_or_init()
        if self.dist.enabled:
            self.model = DDP(self.model)
        self._start_services()
        self._val_batches = eval_batches(self.val_data, cfg.train.seq_len, cfg.train.batch_size,
                                         cfg.train.eval_batches, cfg.train.seed + 1)
        if self.dist.is_main:
            self._write_config()
        ready_after = startup.process_age()
        if self.dist.is_main:
            self._record_event("resume" if resumed_from is not None else "start",
                               world_size=self.dist.world_size, device=str(self.dist.device),
                               **({"startup_s": round(ready_after, 2)} if ready_after is not None else {}))
        if ready_after is not None:
            log.info("training from step %d, %.1fs after the process started", self.state.step, ready_after)
        startup.resume_gc()
        log.info("config %s", cfg.to_dict())
        start_step = self.state.step
        started = time.monotonic()
        window_start, window_tokens = started, 0
        loss = val_loss = None
        tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        while self.state.step < cfg.train.max_steps:
            code = self._stop_code()
            if code >= _STOP:
                return self._preempt(resumed_from, started)
            if code >= _EARLY_SAVE:
                self._early_save = False
                if self.checkpoints.last_commit is None or self.checkpoints.last_commit.step < self.state.step:
                    self._record_event("early_checkpoint", reason="rebalance")
                    self._save()
            loss = self._train_step()
            if loss is None:  # abandoned: the deadline is near
                return self._preempt(resumed_from, started)
            self.state.step += 1
            self.state.tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            step = self.state.step
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                loss = distributed.all_reduce_mean(loss, self.dist)
                now = time.monotonic()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                values = {"loss": loss, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tps,
                          "step": step, "interruptions": self._interruptions}
                if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
                    val_loss = self._evaluate()
                    values["val_loss"] = val_loss
                if self.ledger is not None:
                    values["cost_usd"] = self._prior_cost + self.ledger.update(self.state.tokens_seen)
                self._log_metrics(values, time.monotonic() - started)  # the evaluation included
                self.on_progress({"step": step, "max_steps": cfg.train.max_steps, "loss": loss,
                                  "val_loss": val_loss, "tokens_per_s": tps, "start_step": start_step})
                if self._over_budget(values):
                    return self._stop_for_budget(resumed_from, started, values["cost_usd"])
            else:
                self.on_progress({"step": step, "max_steps": cfg.train.max_steps, "loss": loss,
                                  "start_step": start_step})
            if self.checkpoints.should_save(step):
                self._save()
            self._after_commit()
        return self._finish(resumed_from, started, val_loss)

    def _log_metrics(self, values: dict[str, Any], elapsed: float) -> None:
        if self.records is None:
            return
        self.records.metric(tokens=self.state.tokens_seen, elapsed_s=round(elapsed, 3), **values)
        self.sinks.write(self.state.step, values)

    def _over_budget(self, values: dict[str, Any]) -> bool:
        limit = self.config.train.max_cost_usd
        over = limit is not None and values.get("cost_usd", 0.0) > limit
        return distributed.all_reduce_max(1.0 if over else 0.0, self.dist) > 0

    # ----------------------------------------------------------------- endings
    def _commit_now(self, deadline: float | None = None) -> int | None:
        """Flush the in-flight save, then save the current step unless it is already committed.
        The caller uploads the run's records afterwards, once, with its exit record."""
        self.checkpoints.flush()
        self._after_commit(upload_records=False)
        committed = self.checkpoints.last_commit
        if committed is not None and committed.step >= self.state.step:
            return committed.step
        if deadline is not None:
            left = deadline - time.monotonic()
            if self._last_save_seconds > left:
                log.warning(
                    "estimated checkpoint time %.1fs exceeds the %.1fs left before the deadline: "
                    "step %s stays authoritative", self._last_save_seconds, left,
                    committed.step if committed else "none",
                )
                return committed.step if committed else None
        self._save(blocking=True, upload_records=False)
        return self.state.step

    def _preempt(self, resumed_from: int | None, started: float) -> TrainResult:
        stop = self._stop or _StopRequest("signal:peer", time.monotonic(), time.monotonic() + self.config.spot.grace_seconds)
        log.warning("stopping at step %d: %s; committing an emergency checkpoint", self.state.step, stop.reason)
        t0 = time.monotonic()
        committed = self._commit_now(stop.deadline)
        durable = time.monotonic()
        lost = self.state.step - (committed or 0)
        notice_to_durable = durable - stop.received
        log.warning("durable at step %s in %.2fs (%.2fs after the notice); %d steps lost",
                    committed, durable - t0, notice_to_durable, lost)
        self._record_event("exit", reason=stop.reason, exit_code=EXIT_PREEMPTED, committed_step=committed,
                           notice_to_durable_s=round(notice_to_durable, 3), lost_steps=lost)
        self._upload_records()
        result = self._result("preempted", resumed_from, started)
        result.reason, result.notice_to_durable_s, result.lost_steps = stop.reason, notice_to_durable, lost
        raise Preempted(
            f"preempted ({stop.reason}) at step {self.state.step}: checkpoint step {committed} is durable "
            f"in {self.config.checkpoint.store} ({notice_to_durable:.1f}s after the notice); resume elsewhere"
        )

    def _stop_for_budget(self, resumed_from: int | None, started: float, cost: float) -> TrainResult:
        log.warning("cost $%.4f exceeds train.max_cost_usd $%.4f: stopping with a checkpoint",
                    cost, self.config.train.max_cost_usd)
        committed = self._commit_now()
        self._record_event("budget", cost_usd=round(cost, 6), limit_usd=self.config.train.max_cost_usd,
                           committed_step=committed)
        self._record_event("exit", reason="budget", exit_code=0, committed_step=committed, lost_steps=0)
        self._upload_records()
        result = self._result("budget", resumed_from, started)
        result.reason = f"cost ${cost:.4f} exceeded train.max_cost_usd ${self.config.train.max_cost_usd}"
        return result

    def _finish(self, resumed_from: int | None, started: float, val_loss: float | None) -> TrainResult:
        self._commit_now()
        result = self._result("completed", resumed_from, started)
        if val_loss is None:
            val_loss = self._evaluate()
        result.val_loss = val_loss
        result.unigram_entropy = self.train_data.unigram_entropy()
        if self.dist.is_main:
            model = self.model.module if isinstance(self.model, DDP) else self.model
            result.final_dir = self.run_dir / "final"
            save_hf(model, result.final_dir)
            (result.final_dir / "tokenizer.json").write_text(
                f'{{"tokenizer": "{self.tokenizer.name}", "spec": "{self.config.data.tokenizer}"}}\n'
            )
            result.loss_plot = self._plot_loss()
            result.sample = self._sample(model)
            self._record_event("exit", reason="completed", exit_code=0, lost_steps=0)
            if self.config.checkpoint.store.startswith("s3://"):
                self.checkpoints.upload_dir(result.final_dir, "final")
                if result.loss_plot is not None:
                    self.checkpoints.upload_run_file("loss.png", result.loss_plot)
            self._upload_records()
        distributed.barrier(self.dist)
        return result

    def _result(self, status: str, resumed_from: int | None, started: float) -> TrainResult:
        elapsed = time.monotonic() - started
        steps = self.state.step - (resumed_from or 0)
        tokens = steps * self.config.train.batch_size * self.config.train.seq_len
        return TrainResult(
            status=status, step=self.state.step, tokens_seen=self.state.tokens_seen, run_dir=self.run_dir,
            store=self.config.checkpoint.store, elapsed_s=elapsed, tokens_per_s=tokens / max(elapsed, 1e-9),
            resumed_from=resumed_from,
        )

    def _plot_loss(self) -> Path | None:
        if not self.config.logging.plot:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        try:
            metrics = read_run(self.config.checkpoint.store).metrics
        except Exception:  # the store is unreachable now: plot what this machine has
            metrics = _local_metrics(self.run_dir)
        steps = [m["step"] for m in metrics if "loss" in m]
        if not steps:
            return None
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, [m["loss"] for m in metrics if "loss" in m], label="train loss")
        val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        entropy = self.train_data.unigram_entropy()
        ax.axhline(entropy, color="grey", linestyle="--", label=f"unigram entropy {entropy:.2f}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        path = self.run_dir / "loss.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def _sample(self, model: MambaLM) -> str | None:
        n = self.config.train.sample_tokens
        if n <= 0:
            return None
        prompt = torch.tensor([self.tokenizer.encode("The ")], dtype=torch.long, device=self.dist.device)
        generator = torch.Generator(device=self.dist.device).manual_seed(self.config.train.seed)
        model.eval()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=n, temperature=0.8, top_k=40, generator=generator)
        text = self.tokenizer.decode(out[0].tolist())
        if self.records is not None:
            (self.records.dir / "sample.txt").write_text(text)
        return text


def _local_metrics(run_dir: Path) -> list[dict[str, Any]]:
    import json

    rows = []
    for path in sorted((run_dir / "records").glob("*/metrics.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def train(config: Config, **kwargs: Any) -> TrainResult:
    """Run training to completion (or to a preemption, which raises Preempted)."""
    return Trainer(config, **kwargs).run()


__all__ = ["Trainer", "TrainResult", "train", "local_run_dir"]
