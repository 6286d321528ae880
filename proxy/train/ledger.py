"""One run's bookkeeping, in one place: the run ledger.

A standalone run owns one :class:`RunLedger`; each member of an ensemble owns one too, so their
records cannot drift apart. The ledger writes the run directory (proxy/records.py) and mirrors
it to the sinks: wandb, TensorBoard, the log (proxy/train/tracking.py):

    claim()            take the run directory: its lock (one writer at a time), and refuse a fresh
                       run over a directory that already holds one (resume it instead); a resume
                       whose config differs from the stored one beyond RESUME_MAY_CHANGE is refused
    read_checkpoint()  the newest checkpoint that loads (torn ones skipped, refused ones named)
    open() / start()   wandb, then the record: config.yaml and the summary of a running run
    log() / event()    metrics.jsonl rows and events (and wandb), the running numbers the summary needs
    save_checkpoint()  checkpoints/step_XXXXXXX.pt in the one checkpoint format, the last k kept
    finish() / fail()  the final summary (proxy/train/runtime.py: summary_fields), or the error
    release()          files closed, lock released (also after a crash)

Nothing already written is lost: until ``open()`` the ledger has written nothing but its lock
file, so a start that fails (a bad resume, a torn or refused checkpoint, wandb without a login)
leaves an existing run directory as it was and says why in ``start_error.txt``.

What a row holds is built by :func:`step_row` plus the diagnostics; what a checkpoint holds is
:func:`checkpoint_state`. Under data parallelism only rank 0's ledger writes (``main=False``
gives a ledger that keeps the running numbers and writes nothing).
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from proxy.config import Config, ConfigError, as_dict
from proxy.records import (
    ATTN_MAX_LOGIT,
    ATTN_MAX_LOGIT_PEAK,
    CHECKPOINTS,
    CONFIG,
    ERROR_FILE,
    FAILED,
    GRAD_NORM,
    KITS_DIR,
    LR,
    OUTPUT_LOGIT_MEAN,
    PROBE_LOSS,
    REMEDY,
    ROLLBACK_DIR,
    RUNNING,
    START_ERROR_FILE,
    SUMMARY,
    TOKENS,
    TRAIN_LOSS,
    TRAIN_TOTAL_LOSS,
    TRAIN_Z_LOSS,
    UNKNOWN,
    NullRecord,
    RunLock,
    RunRecord,
    StateFileError,
    atomic_write_text,
    check_no_links,
    checkpoints,
    holds_run,
    load_run,
    load_state,
    read_json,
    remove_temporaries,
    save_state,
    state_step,
)
from proxy.spikes import loss_spikes
from proxy.train.remedies import Event
from proxy.train.resume import ResumeCheck, accumulate, check_resume, runtime_changes, trained_config
from proxy.train.runtime import code_version, summary_fields
from proxy.train.tracking import Sinks, open_sinks

CHECKPOINT_NAME = "step_{step:07d}.pt"
MAX_LISTED = 50  # loss-spike steps a summary lists
CHECKPOINT_KEYS = ("model", "optimizer", "step", "data_position", "tokens", "loss_at_init", "rng_cpu")

log = logging.getLogger("proxy.train")


class RunDirTaken(ConfigError):
    """A fresh run asked to write into a directory that already holds a run."""


def step_row(
    *, tokens: int, loss: float, z_loss: float, total_loss: float, lr: float, grad_norm: float
) -> dict[str, float]:
    """The scalars every train row has, under the contract's keys (standalone and ensemble)."""
    return {
        TOKENS: tokens,
        TRAIN_LOSS: loss,
        TRAIN_Z_LOSS: z_loss,
        TRAIN_TOTAL_LOSS: total_loss,
        LR: lr,
        GRAD_NORM: grad_norm,
    }


def checkpoint_state(
    *,
    model: dict,
    optimizer: dict,
    step: int,
    data_position: int,
    tokens: int,
    loss_at_init: Optional[float],
    remedy: dict,
    record_lines: int,
    config: Optional[dict] = None,
) -> dict[str, Any]:
    """The one checkpoint format (loads with ``torch.load(weights_only=True)``): the state at the
    start of ``step``, how many metrics.jsonl lines the run had written by then, and the config it
    was trained with (what a resume is compared with: an edited config.yaml cannot slip through)."""
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
        "config": config,  # as_dict(cfg): plain data
    }


class RunLedger:
    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        run_name: str,
        sweep_id: Optional[str] = None,
        *,
        resume: bool = False,
        main: bool = True,
        concurrent_wandb: bool = False,
    ):
        self.cfg, self.dir, self.run_name, self.sweep_id, self.main = cfg, Path(run_dir), run_name, sweep_id, main
        self.resume, self.concurrent_wandb = resume, concurrent_wandb
        self.lock = RunLock(self.dir)
        self.record: Optional[RunRecord] = None  # opened by open(), after the start is validated
        self.sinks: Optional[Sinks] = None  # wandb, TensorBoard, the log: opened by open()
        self.existed = False  # the directory held a run record before this process came
        self.resume_check = ResumeCheck()  # on resume: what differs from the stored config (claim)
        self.stats_seen: dict[str, float] = {}  # what the summary reports of the logged statistics
        self.recent_losses: list[float] = []  # the last log_every train losses: final_train_loss
        self._clock = time.time()

    @property
    def summary(self) -> dict[str, Any]:
        return self.record.summary if self.record is not None else {}

    @property
    def _open_record(self) -> RunRecord:
        """The record, for what writes to it: only after open() (start() opens it if need be)."""
        assert self.record is not None, "the run ledger is not open"
        return self.record

    @property
    def _open_sinks(self) -> Sinks:
        """wandb, TensorBoard, the log: opened with the record."""
        assert self.sinks is not None, "the run ledger is not open"
        return self.sinks

    # -- start ---------------------------------------------------------------------------------
    def claim(self) -> None:
        """Take the directory (its lock; RunDirBusy if another process writes it). A fresh run
        over an existing run record is refused (RunDirTaken): resume it, or choose another dir.
        A resume whose config differs from the stored one beyond what a resume may change is
        refused (ResumeRefused, proxy/train/resume.py), on every rank alike: it only reads."""
        if self.main:
            self._take_dir()
        if self.resume:  # against config.yaml now; against the checkpoint's own config once it is read
            self.resume_check = check_resume(self.dir, self.cfg, absent_ok=True)
            # a resume goes on in the stored run's sweep (a member's, a multirun job's)
            self.sweep_id = self.sweep_id or _stored_summary(self.dir).get("sweep_id")

    def _take_dir(self) -> None:
        if self.dir.is_dir():
            check_no_links(self.dir)  # before the lock file is even created
        self.lock.acquire()
        check_no_links(self.dir)  # and again, now that no other writer of ours can add one
        self.existed = holds_run(self.dir)
        if self.existed and not self.resume:
            status = _previous_status(self.dir)
            raise RunDirTaken(
                f"{self.dir} already holds a run (status {status}): continue it with "
                "train.resume=true, or give this run another out_dir"
            )
        self._sweep_temporaries()

    def _sweep_temporaries(self) -> None:
        """Remove what a process killed mid-write left behind (``.step_0000020.pt.<random>.tmp``):
        only this run's own folders, only the atomic writer's temporary names, under the lock."""
        folders = [self.dir, self.dir / CHECKPOINTS, self.dir / ROLLBACK_DIR]
        kits = self.dir / KITS_DIR
        if kits.is_dir() and not kits.is_symlink():
            folders += sorted(p for p in kits.iterdir() if p.is_dir() and not p.is_symlink())
        for path in remove_temporaries(folders):
            log.warning("removed %s, left by an interrupted write", path)

    def read_checkpoint(self, map_location: Any) -> tuple[Path, dict[str, Any], list[str]]:
        """(path, state, skipped) of the newest checkpoint that loads. A torn one (truncated,
        corrupt) is skipped, and ``skipped`` says which and why; a refused one (it asks to run
        code) ends the resume naming the file: it was not written by proxy."""
        found = checkpoints(self.dir)
        if not found:
            raise ConfigError(f"train.resume=true but {self.dir} has no checkpoint")
        skipped = []
        for path in reversed(found):
            try:
                state = load_state(path, map_location)
            except StateFileError as exc:
                if not exc.torn:
                    raise
                skipped.append(f"{path.name}: {exc}")
                log.warning("resume: skipped %s", exc)
                continue
            missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
            if missing or state["step"] != state_step(path):
                why = f"missing {', '.join(missing)}" if missing else f"holds step {state['step']}"
                raise StateFileError(f"{path}: not a proxy checkpoint ({why})", torn=False)
            self._check_trained(path, state)
            return path, state, skipped
        raise StateFileError(f"{self.dir}: no checkpoint loads ({'; '.join(skipped)})", torn=True)

    def _check_trained(self, path: Path, state: dict[str, Any]) -> None:
        """Compare this resume with the config the checkpoint was trained with (claim compared
        it with config.yaml, which a hand edit can change): ResumeRefused, one line, where it
        differs beyond what a resume may change, unless train.resume_override (then recorded)."""
        trained = trained_config(path, state)
        if trained is not None:
            self.resume_check = check_resume(self.dir, self.cfg, trained, source=f"{CHECKPOINTS}/{path.name}")
        else:  # a checkpoint from before checkpoints carried their config: config.yaml must say
            self.resume_check = check_resume(self.dir, self.cfg)

    def open(self, resume_step: Optional[int] = None, lines: Optional[int] = None) -> None:
        """Open wandb, then the record; a resume from the checkpoint of ``resume_step`` cuts
        metrics.jsonl back to it (its first ``lines`` lines). Up to here nothing but the lock
        file was written."""
        cfg = self.cfg
        self.sinks = open_sinks(
            cfg,
            self.dir,
            self.run_name,
            self.sweep_id,
            main=self.main,
            concurrent=self.concurrent_wandb,
            resume_step=resume_step,
        )
        self.record = (RunRecord if self.main else NullRecord)(self.dir, resume=self.resume)
        if resume_step is not None:
            self.record.truncate_after(resume_step - 1, lines)
            self._set_aside_newer(resume_step)

    def start(
        self,
        *,
        overrides: tuple[str, ...],
        n_params: int,
        n_params_non_embedding: int,
        device: torch.device,
        data: dict,
        lr: float,
        **extra: Any,
    ) -> None:
        """Write config.yaml and mark the run running; the wall clock starts (or, on resume,
        goes on from the recorded wall time)."""
        if self.record is None:
            self.open()
        cfg = self.cfg
        previous_wall = self.summary.get("wall_time_s", 0.0) if self.resume else 0.0
        threads = thread_settings()
        resumed = self._resume_fields(device, extra.get("backends"), threads) if self.resume else {}
        if self.main:
            atomic_write_text(self.dir / CONFIG, OmegaConf.to_yaml(OmegaConf.create(as_dict(cfg))))
        self._open_record.update(
            status=RUNNING,
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
            threads=threads,  # results are bitwise only at the same thread count (README)
            code=code_version() or None,  # the commit it trains with; a resume's change is in resumed_with
            **resumed,
            **extra,
        )
        self._clock = time.time() - previous_wall
        self._open_sinks.started(self.summary)

    def _resume_fields(self, device: torch.device, backends: Optional[dict], threads: dict) -> dict[str, Any]:
        """What this resume changed: the config keys it may change, and where and with what code
        the run now executes (device, resolved backends, threads, commit), against the stored
        summary; and the
        changes train.resume_override forced, kept over every resume."""
        now = {"device": str(device), "backends": backends or {}, "threads": threads, "code": code_version() or None}
        previous = {key: self.summary.get(key) for key in now if self.summary.get(key) is not None}
        fields: dict[str, Any] = {"resumed_with": {**self.resume_check.resumed_with, **runtime_changes(previous, now)}}
        if self.resume_check.forced or self.summary.get("resume_override"):
            fields["resume_override"] = accumulate(self.summary.get("resume_override"), self.resume_check.forced)
        return fields

    def update(self, **fields: Any) -> None:
        self._open_record.update(**fields)

    # -- rows and events -----------------------------------------------------------------------
    def log(self, step: int, row: dict[str, Any]) -> None:
        """One metrics row (and wandb); remembers the statistics the summary reports."""
        self._open_record.log(step, row)
        self._open_sinks.log(step, row)
        if ATTN_MAX_LOGIT in row:
            peak = max(self.stats_seen.get(ATTN_MAX_LOGIT_PEAK, -math.inf), row[ATTN_MAX_LOGIT])
            self.stats_seen[ATTN_MAX_LOGIT_PEAK] = peak
        for key in (ATTN_MAX_LOGIT, OUTPUT_LOGIT_MEAN):
            if key in row:
                self.stats_seen[key] = row[key]

    def track_loss(self, loss: float) -> None:
        """A step's train loss, of which the last ``train.log_every`` make final_train_loss."""
        self.recent_losses = (self.recent_losses + [loss])[-self.cfg.train.log_every :]

    def event(self, step: int, kind: str, **fields: Any) -> None:
        """An event row (a divergence, a spike kit, ...)."""
        self._open_record.event(step, kind, **fields)

    def remedy_event(self, event: Event) -> None:
        """A remedy's action: an event row, and a ``remedy/<kind>`` mark in wandb."""
        self._open_record.event(event.step, event.kind, **event.record_fields())
        self._open_sinks.log(event.step, {REMEDY + event.kind: 1})

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, step: int, **state: Any) -> Optional[Path]:
        """Write ``checkpoint_state(step=step, **state)`` and keep the last
        ``train.keep_checkpoints``; None on a rank that does not write."""
        if not self.main:
            return None
        path = self.dir / CHECKPOINTS / CHECKPOINT_NAME.format(step=step)
        save_state(
            path, checkpoint_state(step=step, record_lines=self._open_record.lines, config=as_dict(self.cfg), **state)
        )
        for old in checkpoints(self.dir)[: -max(1, self.cfg.train.keep_checkpoints)]:
            old.unlink()
        return path

    def _set_aside_newer(self, step: int) -> None:
        """After a resume from ``step``: a newer checkpoint was skipped (torn). Renamed aside
        (``.torn``, kept for a look), it no longer sorts last, so pruning cannot keep it and
        delete the good ones."""
        if not self.main:
            return
        for path in checkpoints(self.dir):
            if state_step(path) > step:
                path.rename(path.with_name(path.name + ".torn"))
                log.warning("resume: %s set aside as %s.torn", path.name, path.name)

    def drop_checkpoints_after(self, step: int) -> None:
        """After a rollback to ``step``: later checkpoints hold the abandoned branch, and a resume
        must not pick one of them up."""
        if not self.main:
            return
        for path in checkpoints(self.dir):
            if state_step(path) > step:
                path.unlink()

    # -- the end -------------------------------------------------------------------------------
    def finish(
        self,
        status: str,
        *,
        steps: int,
        tokens: int,
        diverged_at: Optional[int] = None,
        final_val: Optional[float] = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """The final summary (status completed | diverged | interrupted), wandb closed, the
        record closed, the lock released."""
        fields = summary_fields(
            status,
            steps,
            tokens,
            time.time() - self._clock,
            self.recent_losses,
            self.stats_seen,
            self.summary.get("best_val_loss"),
            diverged_at,
            final_val,
        )
        if self.cfg.train.probe_every and self.main:
            fields.update(self._loss_spikes())
        self._open_record.update(**fields, **extra)
        self._open_sinks.summary(fields)
        self._open_sinks.finish(failed=status == FAILED)
        self.release()
        return self.summary

    def _loss_spikes(self) -> dict[str, Any]:
        """The loss spikes and collapses of the run's probe/loss series as kept (a resume's and a
        rollback's record included): proxy/spikes.py's one definition."""
        steps, values = load_run(self.dir).series(PROBE_LOSS)
        found = loss_spikes(steps, values)
        spikes = [s for s in found if s.kind == "spike"]
        return {
            "loss_spikes": len(spikes),
            "loss_collapses": len(found) - len(spikes),
            "loss_spike_steps": [s.step for s in spikes][:MAX_LISTED],
        }

    def fail(self, exc: BaseException, steps: int, text: Optional[str] = None) -> None:
        """A crash. Once the record is open: status failed with the error in the summary, then
        the traceback in error.txt (the status does not wait on that second write, which a full
        disk may refuse). A start that failed before the record opened writes only
        start_error.txt: a run directory it found is left as it was, and a new one holds no run
        record (so the same command can be run again once the cause is fixed). Another
        process's directory is not touched at all."""
        text = text if text is not None else traceback.format_exc()
        error = f"{type(exc).__name__}: {exc}"
        try:
            if not self.main or not self.lock.held:
                return
            self.lock.free_reserve()  # the room kept for this record (a full disk)
            if self.record is None:
                if not self.existed:  # a run this start does not own is left exactly as it was
                    _best_effort(lambda: atomic_write_text(self.dir / START_ERROR_FILE, text))
                return
            _best_effort(lambda: self.record.update(status=FAILED, error=error, steps_completed=steps))
            _best_effort(lambda: atomic_write_text(self.dir / ERROR_FILE, text))
        finally:
            if self.sinks is not None:
                _best_effort(lambda: self.sinks.finish(failed=True))
            self.release()

    def release(self) -> None:
        """Close the record and release the lock; nothing is written (safe after anything)."""
        if self.record is not None:
            self.record.close()
        self.lock.release()


def thread_settings() -> dict[str, Any]:
    """The CPU thread count the run computes with: results differ from one count to another."""
    return {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _stored_summary(run_dir: Path) -> dict[str, Any]:
    try:
        return read_json(run_dir / SUMMARY)
    except (OSError, ValueError):  # StoredFileError, UnsafePathError: a foreign or torn summary
        return {}


def _previous_status(run_dir: Path) -> str:
    status = _stored_summary(run_dir).get("status")
    return str(status)[:40] if isinstance(status, str) else f"{UNKNOWN}: no readable summary.json"


def _best_effort(write) -> None:
    """A write at the end of a failed run: its own failure (a full disk) is logged, not raised,
    so it cannot hide the error that ended the run or stop the writes after it."""
    try:
        write()
    except OSError as exc:
        log.error("could not record the failure: %s", exc)


__all__ = ["CHECKPOINT_NAME", "RunLedger", "checkpoint_state", "step_row"]
