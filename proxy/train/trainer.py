"""The training loop of one run.

One run = one run directory (proxy/records.py), written through the run ledger. The loop is
deliberately plain::

    for step in range(start, steps):
        remedy.before_step                               # a rollback's snapshot
        lr     <- schedule(step)
        batch  <- data.batch("train", position)          # a pure function of the position
        step   <- forward, backward, clip, remedy's verdict   (proxy/train/step.py)
        observers look; stop if the loss or grad norm diverged   # a result, not a crash
        optimizer step                                   # unless the remedy said skip
        log row (every log_every), eval (every eval_every), checkpoint (every ckpt_every)

Everything measured comes from proxy/train/diagnostics.py; everything written goes through the
ledger. A diverged run ends with status ``diverged`` (and ``proxy-train`` exits 0, so a multirun
goes on); a crash ends with status ``failed`` and the traceback in error.txt; SIGINT / SIGTERM
end it at a step boundary with a checkpoint and status ``interrupted``. Before anything is
written the start is validated (the run dir's lock, the checkpoint a resume loads), so a start
that fails leaves an existing run directory as it was.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from proxy.config import Config, ConfigError, to_config
from proxy.data import build_source
from proxy.model import build_model
from proxy.optim import build_optimizer
from proxy.records import COMPLETED, DIVERGED, INTERRUPTED, ROLLBACK_DIR, TOKENS, VAL_LOSS
from proxy.train import diagnostics, distributed
from proxy.train.capture import SpikeCapture
from proxy.train.ledger import RunLedger, step_row
from proxy.train.observer import StepObserver
from proxy.train.remedies import Event, build_remedy
from proxy.train.runtime import (Diverged, Interrupted, StopSignals, autocast_for, backends,
                                 divergence_reason, mark_token_classes, progress_bar, resolve_device, show_row,
                                 wants_compile)
from proxy.train.step import StepResult, TrainStep

log = logging.getLogger("proxy.train")


class CheckpointError(ConfigError):
    """A checkpoint that loads but cannot be resumed from (it does not fit this config)."""


@dataclass
class RunInfo:
    run_dir: Path
    run_name: str
    sweep_id: Optional[str] = None
    overrides: tuple[str, ...] = ()


class Trainer:
    def __init__(self, cfg: Config, info: RunInfo):
        self.cfg, self.info = cfg, info
        self.dist = distributed.from_env()
        self.device = resolve_device(cfg.train.device, self.dist.local_rank)
        if cfg.train.batch_size % self.dist.world_size:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} (the global batch) is not divisible "
                              f"by the {self.dist.world_size} data-parallel processes")
        distributed.setup(self.dist, self.device)
        info.run_dir = Path(distributed.broadcast(str(info.run_dir)))  # rank 0's directory
        self.run_dir = info.run_dir
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)

        # a resume reads the run's own files back (tokenizer.json: the ids the run was trained on)
        self.source = build_source(cfg.data, run_dir=info.run_dir if cfg.train.resume else None)
        self.source.check_seq_len(cfg.train.seq_len)  # before the run dir is claimed
        self.model = build_model(cfg.model, self.source.vocab_size).to(self.device)
        self.token_classes = mark_token_classes(self.model, self.source, cfg)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        forward = self.model
        if self.dist.enabled:  # averages gradients over ranks during backward
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            forward = DistributedDataParallel(self.model, device_ids=ids)
        self.forward = torch.compile(forward) if wants_compile(cfg, self.device) else forward
        self.autocast = autocast_for(cfg, self.device)
        self.local_batch = cfg.train.batch_size // self.dist.world_size
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len

        # the state a checkpoint restores
        self.step = 0  # the next optimizer step to take
        self.data_position = 0  # the index of the next train batch
        self.tokens = 0
        self.loss_at_init: Optional[float] = None
        # how the loop ended, for the observers' close: completed | diverged | interrupted | crashed
        self.outcome: Optional[str] = None
        self.diverged_at: Optional[int] = None
        self.stop = StopSignals()

        self.ledger = RunLedger(cfg, info.run_dir, info.run_name, info.sweep_id, resume=cfg.train.resume,
                                main=self.dist.is_main)
        snapshot_dir = info.run_dir / ROLLBACK_DIR  # disk snapshots; one folder per rank under DDP
        if self.dist.world_size > 1:
            snapshot_dir = snapshot_dir / f"rank_{self.dist.rank}"
        self.remedy = build_remedy(cfg.remedy, grad_clip=cfg.optim.grad_clip, snapshot_dir=snapshot_dir)
        self.stepper = TrainStep(cfg, self.model, self.optimizer, self.forward, self.autocast, self.device)
        self.observers: list[StepObserver] = []
        if cfg.capture.enabled:  # spike kits
            self.observers.append(SpikeCapture(cfg.capture))
        self._consecutive_skips = 0
        self.updates = diagnostics.UpdateTracker(self.model, self.optimizer)
        self.throughput = diagnostics.Throughput(self.model.flops_per_token(cfg.train.seq_len), self.device)

    # -- data --------------------------------------------------------------------------------
    def batch(self, split: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.source.batch(split, index, self.local_batch, self.cfg.train.seq_len,
                                 rank=self.dist.rank, world_size=self.dist.world_size)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # -- evaluation --------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over a fixed set of held-out batches (the same at every eval)."""
        self.model.eval()
        total = 0.0
        for i in range(self.cfg.train.eval_batches):
            x, y = self.batch("val", i)
            with self.autocast():
                out = self.forward(x, y, ignore_index=self.cfg.loss.ignore_index)
            total += out.ce_loss.item()
        self.model.train()
        return distributed.mean(total / self.cfg.train.eval_batches, self.device)

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, step: int, logging_step: bool) -> dict[str, float]:
        """One optimizer step (or a remedy's skip / rollback). Returns the log row on logging steps."""
        cfg = self.cfg
        if self.remedy is not None:
            self.remedy.before_step(step, self.model, self.optimizer, self.data_position,
                                    extra_state=(self.tokens, self.loss_at_init))
        lr = self.stepper.schedule(step)
        x, y = self.batch("train", self.data_position)
        for observer in self.observers:
            observer.on_batch(self, step, x, y)
        self.data_position += 1

        collect = logging_step and (cfg.train.stats_every == 0 or step % cfg.train.stats_every == 0)
        r = self.stepper.compute(step, lr, x, y, self.remedy, collect_stats=collect, measure_grads=logging_step,
                                 data_position=self.data_position)
        self._judge_event(step, r.event)
        for observer in self.observers:  # before the divergence check: a diverging step is seen too
            observer.on_step_end(self, step, r.loss, r.grad_norm, r.event)
        if not r.skips_update:
            self._check_divergence(step, r.loss, r.grad_norm)

        self.tokens += self.tokens_per_step
        self.throughput.add(self.tokens_per_step)
        self.stepper.apply(r, self.updates if logging_step else None)
        if r.event is not None and r.event.rewinds:
            # the spike's own row ends the abandoned branch, then the event marks where the
            # branch ends: the reader (records.split_branches) relies on that order
            if logging_step:
                self.ledger.log(step, self._row(r))
            self.ledger.remedy_event(r.event)
            restored = self.remedy.restore(self.model, self.optimizer)
            self.step, self.data_position = restored.step, restored.data_position
            self.tokens, self.loss_at_init = restored.extra_state
            self.ledger.drop_checkpoints_after(restored.step)
            return {}
        self.step = step + 1
        self.ledger.track_loss(r.loss)
        return self._row(r) if logging_step else {}

    def _row(self, r: StepResult) -> dict[str, float]:
        """The log row of a step: grad stats, updates, forward and data statistics, the scalars."""
        row = dict(r.grad_stats)
        row.update(self.updates.after())
        row.update(distributed.reduce_stats(diagnostics.forward_stats(r.out), self.device) if r.collect else {})
        row.update(getattr(self.source, "last_batch_info", {}))
        row.update(step_row(tokens=self.tokens, loss=r.loss,
                            z_loss=distributed.mean(r.out.z_loss.item(), self.device),
                            total_loss=distributed.mean(r.out.loss.item(), self.device),
                            lr=r.lr, grad_norm=r.grad_norm))
        row.update(self.throughput.read())
        return row

    def _judge_event(self, step: int, event: Optional[Event]) -> None:
        """Record the remedy's event (a rollback after its step's row) and count skips in a row."""
        if event is None:
            self._consecutive_skips = 0
            return
        if not event.rewinds:
            self.ledger.remedy_event(event)
        if event.skips_update and not event.rewinds:
            self._consecutive_skips += 1
            limit = self.cfg.remedy.max_consecutive_skips
            if limit and self._consecutive_skips >= limit:
                raise Diverged(step, f"{limit} steps skipped in a row (remedy.max_consecutive_skips)")

    def _check_divergence(self, step: int, loss: float, grad_norm: float) -> None:
        reason = divergence_reason(loss, grad_norm, self.loss_at_init, self.cfg.train)
        if reason is not None:
            raise Diverged(step, reason)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Optional[Path]:
        return self.ledger.save_checkpoint(
            self.step, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            data_position=self.data_position, tokens=self.tokens, loss_at_init=self.loss_at_init,
            remedy=self.remedy.state_dict() if self.remedy is not None else {})

    def restore_checkpoint(self, path: Path, state: dict[str, Any]) -> Optional[int]:
        """Put a checkpoint's state (``ledger.read_checkpoint``) back; returns how many
        metrics.jsonl lines it covers. CheckpointError (one line) when it does not fit."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.remedy is not None and state.get("remedy"):
                self.remedy.load_state_dict(state["remedy"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CheckpointError(f"{path}: cannot resume from it with this config: {first}") from None
        self.step, self.data_position = state["step"], state["data_position"]
        self.tokens, self.loss_at_init = state["tokens"], state["loss_at_init"]
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state.get("rng_cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
        return state.get("record_lines")

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t = self.cfg.train
        self._start()
        progress = progress_bar(t.steps, t.progress if self.dist.is_main else False, self.info.run_name, self.step)
        self.outcome = "crashed"  # until the loop says otherwise
        interrupted: Optional[Interrupted] = None
        try:
            try:
                with self.stop:
                    self._loop(progress)
                self.outcome = COMPLETED
            except Diverged as d:
                self.ledger.event(d.step, DIVERGED, reason=d.reason)
                log.warning("run diverged at step %d: %s", d.step, d.reason)
                self.outcome, self.diverged_at = DIVERGED, d.step
            except Interrupted as i:
                self.outcome, interrupted = INTERRUPTED, i
        finally:
            if progress is not None:
                progress.close()
            for observer in self.observers:
                observer.close(self)
        if self.outcome == DIVERGED:
            return self._finish(DIVERGED, diverged_at=self.diverged_at)
        if interrupted is not None:  # at a step boundary: the state is whole, a resume goes on from here
            checkpoint = self.save_checkpoint()
            log.warning("run interrupted by %s at step %d", interrupted, self.step)
            return self._finish(INTERRUPTED, interrupted_by=str(interrupted),
                                checkpoint=str(checkpoint) if checkpoint else None)
        final_val = self.evaluate()
        self.ledger.log(t.steps, {VAL_LOSS: final_val, TOKENS: self.tokens})
        if t.save_final:
            self.save_checkpoint()
        return self._finish(COMPLETED, final_val=final_val)

    def _loop(self, progress) -> None:
        t = self.cfg.train
        while self.step < t.steps:
            self._check_stop()  # SIGINT / SIGTERM: stop here, between two steps
            step = self.step
            if step % t.eval_every == 0:
                val = self.evaluate()
                if self.loss_at_init is None:
                    self.loss_at_init = val
                    self.ledger.update(loss_at_init=val)
                self.ledger.log(step, {VAL_LOSS: val})
                show_row(progress, {VAL_LOSS: val})
            logging_step = step % t.log_every == 0 or step == t.steps - 1
            row = self.train_step(step, logging_step)  # advances self.step (a rollback rewinds it)
            if row:
                self.ledger.log(step, row)
                show_row(progress, row)
            if progress is not None:
                progress.n = self.step
                if row:
                    progress.refresh()
            if t.ckpt_every and self.step % t.ckpt_every == 0 and 0 < self.step < t.steps:
                self.save_checkpoint()

    def _check_stop(self) -> None:
        """Stop at this step boundary if a signal asked to, on every rank together: a signal
        that reached one rank (a scheduler's SIGTERM can) stops them all at the same step."""
        signum = self.stop.signum or 0
        if self.dist.enabled:
            signum = distributed.max_int(signum, self.device)
        if signum:
            raise Interrupted(signum)

    def _start(self) -> None:
        """Validate, then write: the lock, the checkpoint a resume starts from (read and put
        back), and only then wandb and the record."""
        self.ledger.claim()
        resumed: dict[str, Any] = {}
        if self.cfg.train.resume:
            path, state, skipped = self.ledger.read_checkpoint(self.device)
            lines = self.restore_checkpoint(path, state)
            self.ledger.open(resume_step=self.step, lines=lines)
            log.info("resumed from %s at step %d", path, self.step)
            resumed = {"resumed_from": str(path)}
            if skipped:
                resumed["skipped_checkpoints"] = skipped
        self.ledger.start(overrides=self.info.overrides, n_params=self.model.n_params(),
                          n_params_non_embedding=self.model.n_params(non_embedding=True), device=self.device,
                          data=self.source.describe(), lr=self.cfg.optim.lr,
                          backends=backends(self.cfg, self.device), token_classes=self.token_classes, **resumed)
        if self.dist.is_main:
            self.source.save(self.run_dir)  # what decodes the run's checkpoints (a BPE tokenizer)

    def _finish(self, status: str, diverged_at: Optional[int] = None,
                final_val: Optional[float] = None, **extra: Any) -> dict[str, Any]:
        if self.remedy is not None and status != INTERRUPTED:
            self.remedy.close()  # e.g. disk snapshots: of no use once the run has ended for good
        return self.ledger.finish(status, steps=self.step, tokens=self.tokens, diverged_at=diverged_at,
                                  final_val=final_val, **extra)


# --------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------
def train(cfg: Config | dict, run_dir: str | Path, run_name: Optional[str] = None,
          sweep_id: Optional[str] = None, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train one run into ``run_dir`` and return its summary. Never raises on divergence."""
    cfg = to_config(cfg) if not isinstance(cfg, Config) else cfg
    run_dir = Path(run_dir)
    info = RunInfo(run_dir, run_name or cfg.run_name or run_dir.name, sweep_id, tuple(overrides))
    trainer = Trainer(cfg, info)
    try:
        return trainer.run()
    except Exception as exc:
        trainer.ledger.fail(exc, trainer.step)
        raise
    finally:
        trainer.ledger.release()  # also after a KeyboardInterrupt: the lock must not outlive the run
        distributed.teardown()


__all__ = ["CheckpointError", "RunInfo", "Trainer", "train"]
