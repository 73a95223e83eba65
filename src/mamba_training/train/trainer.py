"""The trainer: one orchestrator that follows a step from data to optimizer.

It wires the components together — data sampler, model, AdamW + schedule, checkpoint manager,
stop path, spot watcher, metric sinks, cost ledger — and knows none of their insides. Everything
that must survive a restart is Stateful (state_dict / load_state_dict) and handed to the
checkpoint manager.

The loop: at each step boundary every rank takes the same decision (train/stopping.py: go on,
checkpoint first, or stop) before the step draws its batch; then one optimizer step; then its
metrics. A stop commits an emergency checkpoint, records why, and raises Preempted (exit 75).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from mamba_training.checkpoint import CheckpointManager, CheckpointPolicy
from mamba_training.config import Config, accumulation_steps
from mamba_training.data import BatchSampler, TokenDataset, eval_batches, load_tokenizer, resolve_corpus
from mamba_training.errors import EXIT_PREEMPTED, Preempted, UsageError
from mamba_training.logging_setup import add_json_log
from mamba_training.model import MambaConfig, MambaLM, load_hf_weights, save_hf
from mamba_training.model.scan import resolve_scan_name
from mamba_training.train import distributed, leaving, startup
from mamba_training.train.control import Control
from mamba_training.train.metrics import CloudWatchSink, Sinks, TensorBoardSink
from mamba_training.train.optim import build_optimizer, build_scheduler
from mamba_training.train.precision import autocast_for
from mamba_training.train.records import LEDGER, LOG, RecordWriter, new_segment_id, read_run
from mamba_training.train.report import describe_event
from mamba_training.train.state import TrainState, seed_rng
from mamba_training.train.stopping import BUDGET, PREEMPT, Decision, StopPath, save_fits

# How long a leaving node's workers wait for their launcher to stop them after the commit.
LEAVE_WAIT_SECONDS = 60.0

log = logging.getLogger(__name__)


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


def local_run_dir(store: str, cache_dir: str) -> Path:
    """Where this process keeps the run's files: the store itself when local, a cache for S3."""
    if store.startswith("s3://"):
        return Path(cache_dir) / "runs" / store[len("s3://"):].strip("/")
    if store.startswith("file://"):
        return Path(store[len("file://"):])
    return Path(store)


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
        self.control = Control.from_env()

    # ----------------------------------------------------------------- set-up
    def _setup(self) -> None:
        cfg = self.config
        self.dist = distributed.setup(cfg.train.device, cfg.train.collective_timeout_s, cfg.train.long_wait_timeout_s)
        # The global batch is train.batch_size at any world size; each rank takes its share in
        # `accum` micro-batches (derived from the world size when train.micro_batch_size is set).
        self.accum = accumulation_steps(cfg.train, self.dist.world_size)
        self.micro_batch = cfg.train.batch_size // self.dist.world_size // self.accum
        # A scan backend or precision this device cannot run is refused now, before any work.
        resolve_scan_name(cfg.model.scan, self.dist.device)
        self.amp = autocast_for(cfg.train.amp, self.dist.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_rng(cfg.train.seed + self.dist.rank)
        self.segment = new_segment_id()
        self.run_dir = local_run_dir(cfg.checkpoint.store, cfg.checkpoint.cache_dir)
        self.records = RecordWriter(self.run_dir, self.segment) if self.dist.is_main else None
        self._log_handler = add_json_log(self.run_dir / "records" / self.segment / LOG) if self.dist.is_main else None

        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if not self.dist.is_main:
            distributed.wait_for_all(self.dist)  # rank 0 prepares the corpus once
        prepared = resolve_corpus(cfg.data.corpus, cfg.data.tokenizer, cfg.data.val_fraction, cfg.data.cache_dir,
                                  dtype=cfg.data.shard_dtype)
        if self.dist.is_main:
            distributed.wait_for_all(self.dist)
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
        self.state = TrainState(cfg.train.seed, self.dist.rank, self.dist.world_size)
        self.stopping = StopPath(self.dist, grace_seconds=cfg.spot.grace_seconds,
                                 rebalance_checkpoint=cfg.spot.rebalance_checkpoint, record=self._record_event)
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

    # ----------------------------------------------------------------- records
    def _record_event(self, kind: str, **fields: Any) -> None:
        if self.records is not None:
            self.records.event(kind, step=self.state.step, **fields)
        log.info("event: %s", describe_event(kind, self.state.step, fields))

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
    def _train_step(self) -> torch.Tensor:
        """One optimizer step over `accum` micro-batches of this rank's share of the global batch.
        Whether to take it at all was decided at the boundary, by every rank together: a step once
        begun is finished."""
        cfg = self.config.train
        self.model.train()
        x, y = self.sampler.next_batch()
        x, y = x.to(self.dist.device, non_blocking=True), y.to(self.dist.device, non_blocking=True)
        micro = self.accum
        xs, ys = x.split(self.micro_batch), y.split(self.micro_batch)
        total = torch.zeros((), device=self.dist.device)  # on the device: no host sync per micro-batch
        for i, (mx, my) in enumerate(zip(xs, ys)):
            last = i == micro - 1
            sync = nullcontext() if last or not isinstance(self.model, DDP) else self.model.no_sync()
            with sync, self.amp:
                logits = self.model(mx)
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), my.reshape(-1))
            (loss / micro).backward()
            total += loss.detach() / micro
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total

    @torch.no_grad()
    def _evaluate(self) -> float:
        cfg = self.config.train
        model = self.model.module if isinstance(self.model, DDP) else self.model
        model.eval()
        per_rank = max(1, cfg.batch_size // self.dist.world_size)
        losses = []
        for x, y in self._val_batches[: cfg.eval_batches]:
            x, y = x[:per_rank].to(self.dist.device), y[:per_rank].to(self.dist.device)
            for mx, my in zip(x.split(self.micro_batch), y.split(self.micro_batch)):  # no bigger than training's
                with self.amp:
                    logits = model(mx)
                losses.append(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), my.reshape(-1)).item())
        return float(np.mean(losses))

    def _save(self) -> None:
        """Checkpoint the current step; every rank calls it at the same boundary (a collective)."""
        self.state.capture_rng(self.dist)
        self._hand_off()
        # Rank 0 may have waited for the previous upload, or written this one synchronously:
        # the others wait here, not in the next step's short-timeout collectives.
        distributed.wait_for_all(self.dist)

    def _hand_off(self, blocking: bool = False, upload_records: bool = True) -> None:
        """Give the captured state to the checkpoint manager (rank 0 writes, others return)."""
        self._saved_step = self.state.step
        self.checkpoints.save(self.state.step, self.state.tokens_seen, self._app_state())
        if blocking or not self.config.checkpoint.async_save:
            self.checkpoints.flush()
            self._after_commit(upload_records)

    def _after_commit(self, upload_records: bool = True) -> None:
        """Record a new commit in the run's events, and how long it took as the next estimate of
        a save (async commits too); upload the records with it unless the caller (an ending,
        which uploads them once after its exit record) says not to."""
        commit = self.checkpoints.last_commit
        if commit is not None and commit.step != getattr(self, "_recorded_commit", None):
            self._recorded_commit = commit.step
            self.stopping.note_commit(commit.seconds)
            self._record_event("checkpoint", checkpoint_step=commit.step, seconds=round(commit.seconds, 3))
            if getattr(self, "sinks", None) is not None:  # the dashboard's CheckpointSeconds
                self.sinks.write(commit.step, {"checkpoint_s": commit.seconds})
            if upload_records:
                self._upload_records()

    # ----------------------------------------------------------------- run
    def run(self) -> TrainResult:
        self._setup()
        self.stopping.install_signals()
        try:
            return self._run()
        except RuntimeError as error:  # a peer lost mid-collective: one line, not torch's traceback
            lost = distributed.peer_lost(error, self.config.train.collective_timeout_s) if self.dist.enabled else None
            if lost is None:
                raise
            raise lost from error
        finally:
            self.stopping.restore_signals()
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
        self.stopping.watcher = self.watcher
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
        from mamba_training.aws.cost import Ledger, ledger_price

        info = self.watcher.instance_info() if self.watcher is not None else {}
        itype = info.get("instance_type") or "local"
        az = info.get("availability_zone") or "local"
        lifecycle = info.get("lifecycle") or ("local" if itype == "local" else "on-demand")
        region = self.config.aws.region or (az[:-1] if az != "local" else None)
        # Off EC2 (an emulator rehearsal) the tables price the run: no AWS call, no credentials.
        price, on_demand, source = ledger_price(itype, az, lifecycle, region, self.config.aws.profile,
                                                self._on_ec2, self.config.train.max_cost_usd)
        log.info("cost ledger: %s %s %s at $%.4f/h (%s)", itype, az, lifecycle, price, source)
        # Earlier segments' cost is first needed at the first metrics line: read it meanwhile.
        self._prior_cost_reader = threading.Thread(target=self._read_prior_cost, name="prior-cost", daemon=True)
        self._prior_cost_reader.start()
        first_step = self.state.step
        clock = self.control.ledger_clock(lambda: self.state.step - first_step)
        return Ledger.start(self.records.dir / LEDGER, itype, az, lifecycle, region, price, on_demand,
                            tokens_at_start=self.state.tokens_seen, clock=clock)

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

    def _log_config(self) -> None:
        """The resolved config: all of it as YAML on the run's log, one line of it on the console."""
        cfg = self.config
        log.info("config (hash %s):\n%s", cfg.hash(), yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
                 extra={"console": False})
        m, t = cfg.model, cfg.train
        log.info("config %s: d_model %s x %s layers, %s steps of %sx%s tokens, lr %g, store %s (all of it in %s)",
                 cfg.hash(), m.d_model, m.n_layer, t.max_steps, t.batch_size, t.seq_len, t.lr,
                 cfg.checkpoint.store, self.run_dir / "config.yaml", extra={"fields": {"config_hash": cfg.hash()}})

    def _write_config(self) -> None:
        path = self.run_dir / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        if self.config.checkpoint.store.startswith("s3://"):
            self.checkpoints.upload_run_file("config.yaml", path)

    def _run(self) -> TrainResult:
        cfg = self.config
        resumed_from = self._restore_or_init()
        distributed.wait_for_all(self.dist)  # restores take unequal times; DDP's first broadcast is short
        if self.dist.enabled:
            cuda = self.dist.device.type == "cuda"
            self.model = DDP(self.model, device_ids=[self.dist.device.index] if cuda else None)
        self._start_services()
        self._val_batches = eval_batches(self.val_data, cfg.train.seq_len, cfg.train.batch_size,
                                         cfg.train.eval_batches, cfg.train.seed + 1)
        if self.dist.is_main:
            self._write_config()
        ready_after = startup.process_age()
        if self.dist.is_main:
            self._record_event("resume" if resumed_from is not None else "start",
                               world_size=self.dist.world_size, device=str(self.dist.device),
                               grad_accum=self.accum, micro_batch_size=self.micro_batch,
                               **({"startup_s": round(ready_after, 2)} if ready_after is not None else {}))
            log.info("world size %d: %d micro-batch%s of %d sequences per rank per step (global batch %d)",
                     self.dist.world_size, self.accum, "" if self.accum == 1 else "es", self.micro_batch,
                     cfg.train.batch_size)
        if ready_after is not None:
            log.info("training from step %d, %.1fs after the process started", self.state.step, ready_after)
        startup.resume_gc()
        self._log_config()
        start_step = self._saved_step = self.state.step  # a restored step is saved; step 0 needs none
        started = time.monotonic()
        window_start, window_tokens = started, 0
        loss = val_loss = None
        tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        while self.state.step < cfg.train.max_steps:
            decision = self.stopping.boundary(self.state.step, self._saved_step,
                                              self.checkpoints.should_save(self.state.step))
            if decision.action == PREEMPT:
                return self._preempt(decision, resumed_from, started)
            if decision.action == BUDGET:
                return self._stop_for_budget(resumed_from, started)
            if decision.save:
                if decision.early:
                    self._record_event("early_checkpoint", reason="rebalance")
                self._save()
            step_loss = self._train_step()
            self.state.step += 1
            self.state.tokens_seen += tokens_per_step
            window_tokens += tokens_per_step
            step = self.state.step
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                loss = distributed.all_reduce_mean(step_loss.item(), self.dist)  # the host reads it here only
                now = time.monotonic()
                tps = window_tokens / max(now - window_start, 1e-9)
                window_start, window_tokens = now, 0
                values = {"loss": loss, "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tps,
                          "step": step, "interruptions": self.stopping.interruptions}
                if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
                    val_loss = self._evaluate()
                    values["val_loss"] = val_loss
                if self.ledger is not None:
                    values["cost_usd"] = self._prior_cost + self.ledger.update(self.state.tokens_seen)
                self._log_metrics(values, time.monotonic() - started)  # the evaluation included
                self.on_progress({"step": step, "max_steps": cfg.train.max_steps, "loss": loss,
                                  "val_loss": val_loss, "tokens_per_s": tps, "start_step": start_step})
                limit = cfg.train.max_cost_usd
                if limit is not None and values.get("cost_usd", 0.0) > limit:
                    self.stopping.request_budget(values["cost_usd"])  # the next boundary stops
            else:
                self.on_progress({"step": step, "max_steps": cfg.train.max_steps, "loss": loss,
                                  "start_step": start_step})
            self._after_commit()
            self._hold(step)
        return self._finish(resumed_from, started, val_loss)

    def _hold(self, step: int) -> None:
        """The rehearsal/test hook (train/control.py): wait at a chosen step for a release or a cause."""
        self.control.hold(
            step, writes=self.dist.local_rank == 0,
            pending=lambda: self.stopping.poll() > 0 or self.stopping.pending(),
            agree=lambda leave: distributed.all_reduce_max(1.0 if leave else 0.0, self.dist) > 0,
        )

    def _log_metrics(self, values: dict[str, Any], elapsed: float) -> None:
        if self.records is None:
            return
        self.records.metric(tokens=self.state.tokens_seen, elapsed_s=round(elapsed, 3), **values)
        self.sinks.write(self.state.step, values)

    # ----------------------------------------------------------------- endings
    def _commit_now(self, deadline: float | None = None, fits: bool = True) -> int | None:
        """Every rank: hand the RNG states to rank 0. Rank 0: flush the in-flight save, then save
        the current step unless it is already committed or the save would not be durable before
        `deadline`. Returns the newest committed step (None on other ranks, which write nothing).
        The caller uploads the run's records afterwards, once, with its exit record."""
        self.state.capture_rng(self.dist)
        if not self.dist.is_main:
            return None
        self.checkpoints.flush()
        self._after_commit(upload_records=False)
        committed = self.checkpoints.last_commit
        if committed is not None and committed.step >= self.state.step:
            return committed.step
        if deadline is not None:
            left = deadline - time.monotonic()
            estimate = self.stopping.save_seconds
            if not (fits and save_fits(left, estimate)):
                log.warning("estimated checkpoint time %.1fs exceeds the %.1fs left before the deadline: "
                            "step %s stays authoritative", estimate, left, committed.step if committed else "none")
                return committed.step if committed else None
        self._hand_off(blocking=True, upload_records=False)
        return self.state.step

    def _preempt(self, decision: Decision, resumed_from: int | None, started: float) -> TrainResult:
        stop = self.stopping.stop_request(decision)
        log.warning("stopping at step %d: %s; committing an emergency checkpoint", self.state.step, stop.reason)
        t0 = time.monotonic()
        committed = self._commit_now(stop.deadline, fits=decision.commit)
        durable = time.monotonic()
        notice_to_durable = durable - stop.received
        lost = self.state.step - (committed or 0)
        if self.dist.is_main:
            log.warning("durable at step %s in %.2fs (%.2fs after the notice); %d steps lost",
                        committed, durable - t0, notice_to_durable, lost)
            self._record_event("exit", reason=stop.reason, exit_code=EXIT_PREEMPTED, committed_step=committed,
                               notice_to_durable_s=round(notice_to_durable, 3), lost_steps=lost)
            self._upload_records()
        # No rank leaves before rank 0 has made the checkpoint durable: a launcher that sees one
        # worker exit may kill the others, rank 0's upload with them.
        distributed.wait_for_all(self.dist)
        node = int(os.environ.get("GROUP_RANK", "0"))  # this node, under torchrun or `launch`
        views = distributed.all_gather_object((node, leaving.node_is_leaving(stop.reason)), self.dist)
        if leaving.node_leaves(views, node):  # the other nodes re-form without this one
            leaving.mark_and_wait(stop.reason, wait_s=LEAVE_WAIT_SECONDS)
        result = self._result("preempted", resumed_from, started)
        result.reason, result.notice_to_durable_s, result.lost_steps = stop.reason, notice_to_durable, lost
        raise Preempted(
            f"preempted ({stop.reason}) at step {self.state.step}: checkpoint step {committed} is durable "
            f"in {self.config.checkpoint.store} ({notice_to_durable:.1f}s after the notice); resume elsewhere"
        )

    def _stop_for_budget(self, resumed_from: int | None, started: float) -> TrainResult:
        cost = self.stopping.budget_cost  # known on rank 0, whose ledger counts the cost
        log.warning("cost $%s exceeds train.max_cost_usd $%.4f: stopping with a checkpoint",
                    f"{cost:.4f}" if cost is not None else "?", self.config.train.max_cost_usd)
        committed = self._commit_now()
        if self.dist.is_main:
            self._record_event("budget", cost_usd=round(cost or 0.0, 6), limit_usd=self.config.train.max_cost_usd,
                               committed_step=committed)
            self._record_event("exit", reason="budget", exit_code=0, committed_step=committed, lost_steps=0)
            self._upload_records()
        distributed.wait_for_all(self.dist)
        result = self._result("budget", resumed_from, started)
        result.reason = f"cost ${cost or 0.0:.4f} exceeded train.max_cost_usd ${self.config.train.max_cost_usd}"
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
        distributed.wait_for_all(self.dist)
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
