"""One run's bookkeeping, in one place: the run ledger.

A standalone run owns one :class:`RunLedger`; each member of an ensemble owns one too, so their
records cannot drift apart. The ledger writes the run directory (proxy/records.py) and mirrors
it to wandb (proxy/train/tracking.py):

    start()            config.yaml and the summary of a running run
    log() / event()    metrics.jsonl rows and events (and wandb), the running numbers the summary needs
    save_checkpoint()  checkpoints/step_XXXXXXX.pt in the one checkpoint format, the last k kept
    finish() / fail()  the final summary (proxy/train/runtime.py: summary_fields), or the error

What a row holds is built by :func:`step_row` plus the diagnostics; what a checkpoint holds is
:func:`checkpoint_state`. Under data parallelism only rank 0's ledger writes (``main=False``
gives a ledger that keeps the running numbers and writes nothing).
"""

from __future__ import annotations

import math
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from proxy.config import Config, as_dict
from proxy.records import (ATTN_MAX_LOGIT, CHECKPOINTS, CONFIG, ERROR_FILE, GRAD_NORM, LR, OUTPUT_LOGIT_MEAN,
                           REMEDY, TOKENS, TRAIN_LOSS, TRAIN_TOTAL_LOSS, TRAIN_Z_LOSS, NullRecord, RunRecord,
                           atomic_write_text, latest_checkpoint, save_state)
from proxy.train.remedies import Event
from proxy.train.runtime import ATTN_MAX_LOGIT_PEAK, summary_fields, without_wandb
from proxy.train.tracking import WandbSink

CHECKPOINT_NAME = "step_{step:07d}.pt"


def step_row(*, tokens: int, loss: float, z_loss: float, total_loss: float, lr: float,
             grad_norm: float) -> dict[str, float]:
    """The scalars every train row has, under the contract's keys (standalone and ensemble)."""
    return {TOKENS: tokens, TRAIN_LOSS: loss, TRAIN_Z_LOSS: z_loss, TRAIN_TOTAL_LOSS: total_loss, LR: lr,
            GRAD_NORM: grad_norm}


def checkpoint_state(*, model: dict, optimizer: dict, step: int, data_position: int, tokens: int,
                     loss_at_init: Optional[float], remedy: dict, record_lines: int) -> dict[str, Any]:
    """The one checkpoint format (loads with ``torch.load(weights_only=True)``): the state at the
    start of ``step``, and how many metrics.jsonl lines the run had written by then."""
    return {
        "model": model,
        "optimizer": optimizer,
        "step": step,
        "data_position": data_position,  # the index of the next train batch
        "tokens": tokens,
        "loss_at_init": loss_at_init,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "remedy": remedy,
        "record_lines": record_lines,  # metrics.jsonl up to here: what a resume keeps
    }


class RunLedger:
    def __init__(self, cfg: Config, run_dir: str | Path, run_name: str, sweep_id: Optional[str] = None, *,
                 resume: bool = False, main: bool = True, concurrent_wandb: bool = False):
        self.cfg, self.dir, self.run_name, self.sweep_id, self.main = cfg, Path(run_dir), run_name, sweep_id, main
        self.record = (RunRecord if main else NullRecord)(self.dir, resume=resume)
        self.wandb = WandbSink(cfg if main else without_wandb(cfg), self.dir, run_name, sweep_id,
                               concurrent=concurrent_wandb)
        self.stats_seen: dict[str, float] = {}  # what the summary reports of the logged statistics
        self.recent_losses: list[float] = []  # the last log_every train losses: final_train_loss
        self._clock = time.time()

    @property
    def summary(self) -> dict[str, Any]:
        return self.record.summary

    # -- start ---------------------------------------------------------------------------------
    def start(self, *, overrides: tuple[str, ...], n_params: int, n_params_non_embedding: int,
              device: torch.device, data: dict, lr: float, **extra: Any) -> None:
        """Write config.yaml and mark the run running; the wall clock starts (or, on resume,
        goes on from the recorded wall time)."""
        cfg = self.cfg
        previous_wall = self.summary.get("wall_time_s", 0.0) if cfg.train.resume else 0.0
        if self.main:
            atomic_write_text(self.dir / CONFIG, OmegaConf.to_yaml(OmegaConf.create(as_dict(cfg))))
        self.record.update(
            status="running",
            run_name=self.run_name,
            sweep_id=self.sweep_id,
            overrides=list(overrides),
            experiment=cfg.experiment,
            steps_planned=cfg.train.steps,
            lr=lr,
            n_params=n_params,
            n_params_non_embedding=n_params_non_embedding,
            device=str(device),
            started_at=self.summary.get("started_at", time.time()),
            data=data,
            **extra,
        )
        self._clock = time.time() - previous_wall

    def update(self, **fields: Any) -> None:
        self.record.update(**fields)

    # -- rows and events -----------------------------------------------------------------------
    def log(self, step: int, row: dict[str, Any]) -> None:
        """One metrics row (and wandb); remembers the statistics the summary reports."""
        self.record.log(step, row)
        self.wandb.log(step, row)
        if ATTN_MAX_LOGIT in row:
            peak = max(self.stats_seen.get(ATTN_MAX_LOGIT_PEAK, -math.inf), row[ATTN_MAX_LOGIT])
            self.stats_seen[ATTN_MAX_LOGIT_PEAK] = peak
        for key in (ATTN_MAX_LOGIT, OUTPUT_LOGIT_MEAN):
            if key in row:
                self.stats_seen[key] = row[key]

    def track_loss(self, loss: float) -> None:
        """A step's train loss, of which the last ``train.log_every`` make final_train_loss."""
        self.recent_losses = (self.recent_losses + [loss])[-self.cfg.train.log_every:]

    def event(self, step: int, kind: str, **fields: Any) -> None:
        """An event row (a divergence, a spike kit, ...)."""
        self.record.event(step, kind, **fields)

    def remedy_event(self, event: Event) -> None:
        """A remedy's action: an event row, and a ``remedy/<kind>`` mark in wandb."""
        self.record.event(event.step, event.kind, **event.record_fields())
        self.wandb.log(event.step, {REMEDY + event.kind: 1})

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, step: int, **state: Any) -> Optional[Path]:
        """Write ``checkpoint_state(step=step, **state)`` and keep the last
        ``train.keep_checkpoints``; None on a rank that does not write."""
        if not self.main:
            return None
        path = self.dir / CHECKPOINTS / CHECKPOINT_NAME.format(step=step)
        save_state(path, checkpoint_state(step=step, record_lines=self.record.lines, **state))
        for old in sorted(path.parent.glob("step_*.pt"))[: -max(1, self.cfg.train.keep_checkpoints)]:
            old.unlink()
        return path

    def drop_checkpoints_after(self, step: int) -> None:
        """After a rollback to ``step``: later checkpoints hold the abandoned branch, and a resume
        must not pick one of them up."""
        if not self.main:
            return
        for path in (self.dir / CHECKPOINTS).glob("step_*.pt"):
            if int(path.stem.split("_")[1]) > step:
                path.unlink()

    def latest_checkpoint(self) -> Optional[Path]:
        return latest_checkpoint(self.dir)

    def truncate_to(self, step: int, lines: Optional[int]) -> None:
        """On resume from the checkpoint at ``step``: drop what was logged after it."""
        self.record.truncate_after(step - 1, lines)

    # -- the end -------------------------------------------------------------------------------
    def finish(self, status: str, *, steps: int, tokens: int, diverged_at: Optional[int] = None,
               final_val: Optional[float] = None) -> dict[str, Any]:
        """The final summary (status completed | diverged), wandb closed, the record closed."""
        fields = summary_fields(status, steps, tokens, time.time() - self._clock, self.recent_losses,
                                self.stats_seen, self.summary.get("best_val_loss"), diverged_at, final_val)
        self.record.update(**fields)
        self.wandb.summary(fields)
        self.wandb.finish(failed=status == "failed")
        self.record.close()
        return self.summary

    def fail(self, exc: BaseException, steps: int, text: Optional[str] = None) -> None:
        """A crash: the traceback in error.txt, status failed with the error in the summary."""
        if self.main:
            (self.dir / ERROR_FILE).write_text(text if text is not None else traceback.format_exc())
        self.record.update(status="failed", error=f"{type(exc).__name__}: {exc}", steps_completed=steps)
        self.wandb.finish(failed=True)
        self.record.close()


__all__ = ["CHECKPOINT_NAME", "RunLedger", "checkpoint_state", "step_row"]
