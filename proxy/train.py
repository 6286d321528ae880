"""The training loop and the ``proxy-train`` Hydra entry point.

One run = one run directory (proxy/records.py). The loop is deliberately plain::

    for step in range(start, steps):
        lr     <- schedule(step)
        batch  <- data.batch("train", position)          # a pure function of the position
        loss   <- model(batch)                           # + attention / logit statistics
        grads  <- backward; grad_norm <- clip
        stop if the loss or grad norm diverged           # a result, not a crash
        optimizer step                                   # unless a remedy says skip
        log row (every log_every), eval (every eval_every), checkpoint (every ckpt_every)

Everything measured comes from proxy/diagnostics.py; everything written goes through the run
record and the wandb sink. A diverged run ends with status ``diverged`` and exit code 0, so a
multirun goes on; a crash ends with status ``failed`` and the error in summary.json.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from proxy import diagnostics, distributed
from proxy.config import Config, ConfigError, as_dict, to_config
from proxy.data import DataError, build_source
from proxy.model import build_model
from proxy.optim import apply_lr, build_optimizer, clip_grad_norm, schedule_multiplier
from proxy.records import CHECKPOINTS, CONFIG, NullRecord, RunRecord, atomic_write_text, latest_checkpoint
from proxy.remedies import ROLLBACK_DIR, Rollback, ZClip, build_remedy
from proxy.tracking import WandbSink

log = logging.getLogger("proxy.train")

CONF_DIR = os.environ.get("PROXY_CONF_DIR", str(Path(__file__).resolve().parents[1] / "conf"))
# overrides that say where or how to run, not what is run: left out of run names
NON_VARIANT_KEYS = ("out_dir", "train.resume", "train.progress", "wandb.", "hydra.", "run_name")


# --------------------------------------------------------------------------------------------
# Devices and precision
# --------------------------------------------------------------------------------------------
def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and local_rank:
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available")
    return device


def autocast_for(cfg: Config, device: torch.device):
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def wants_compile(cfg: Config, device: torch.device) -> bool:
    choice = str(cfg.train.compile).lower()
    return device.type == "cuda" if choice == "auto" else choice == "true"


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class Diverged(Exception):
    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


@dataclass
class RunInfo:
    run_dir: Path
    run_name: str
    sweep_id: Optional[str] = None
    overrides: tuple[str, ...] = ()


def divergence_reason(loss: float, grad_norm: float, loss_at_init: Optional[float], t) -> Optional[str]:
    """Why a step counts as diverged under the ``train.diverge_*`` rules, or None (``t``: TrainConfig)."""
    if not diagnostics.is_finite(loss, grad_norm):
        return f"non-finite {'loss' if not math.isfinite(loss) else 'grad norm'}"
    if t.diverge_loss > 0 and loss > t.diverge_loss:
        return f"train loss {loss:.3g} > train.diverge_loss={t.diverge_loss}"
    if t.diverge_factor > 0 and loss_at_init and loss > t.diverge_factor * loss_at_init:
        return f"train loss {loss:.3g} > {t.diverge_factor} x loss at init"
    return None


def summary_fields(status: str, steps: int, tokens: int, wall_time_s: float, recent_losses: list[float],
                   stats_seen: dict[str, float], previous_best: Optional[float],
                   diverged_at: Optional[int] = None, final_val: Optional[float] = None) -> dict[str, Any]:
    """The summary.json fields every finished run has (standalone or an ensemble member)."""
    losses = [v for v in recent_losses if math.isfinite(v)]
    fields = dict(
        status=status,
        steps_completed=steps,
        tokens=tokens,
        wall_time_s=wall_time_s,
        final_train_loss=sum(losses) / len(losses) if losses else None,
        final_val_loss=final_val,
        diverged_at_step=diverged_at,
        error=None,
        max_attn_logit_peak=stats_seen.get("attn/max_logit_peak"),
        max_attn_logit_final=stats_seen.get("attn/max_logit"),
        output_logit_mean_final=stats_seen.get("output/logit_mean"),
    )
    if final_val is not None:
        fields["best_val_loss"] = final_val if previous_best is None else min(previous_best, final_val)
    return fields


class StepObserver:
    """Something that watches the loop without changing it (e.g. spike capture, proxy/forensics).

    ``on_batch`` sees each train batch before the forward pass, with the state still as it was at
    the start of the step; ``on_step_end`` sees the step's numbers and the remedy event, if any.
    """

    def on_batch(self, trainer: "Trainer", step: int, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        pass

    def on_step_end(self, trainer: "Trainer", step: int, loss: float, grad_norm: float,
                    event: Optional[dict]) -> None:
        pass

    def close(self, trainer: "Trainer") -> None:
        pass


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
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)

        self.source = build_source(cfg.data)
        self.model = build_model(cfg.model, self.source.vocab_size).to(self.device)
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

        main = self.dist.is_main
        self.record = (RunRecord if main else NullRecord)(info.run_dir, resume=cfg.train.resume)
        self.wandb = WandbSink(cfg if main else _without_wandb(cfg), info.run_dir, info.run_name, info.sweep_id)
        snapshot_dir = info.run_dir / ROLLBACK_DIR  # disk snapshots; one folder per rank under DDP
        if self.dist.world_size > 1:
            snapshot_dir = snapshot_dir / f"rank_{self.dist.rank}"
        self.remedy = build_remedy(cfg.remedy, grad_clip=cfg.optim.grad_clip, snapshot_dir=snapshot_dir)
        self.observers: list[StepObserver] = []
        if cfg.capture.enabled:  # spike kits (proxy/forensics.py imports this module: import here)
            from proxy.forensics import SpikeCapture

            self.observers.append(SpikeCapture(cfg.capture))
        self._consecutive_skips = 0
        self.updates = diagnostics.UpdateTracker(self.model, self.optimizer)
        self.throughput = diagnostics.Throughput(self.model.flops_per_token(cfg.train.seq_len), self.device)
        self._recent_train_losses: list[float] = []
        self._stats_seen: dict[str, float] = {}

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
        if isinstance(self.remedy, Rollback):
            self.remedy.maybe_snapshot(step, self.model, self.optimizer, self.data_position,
                                       extra_state=(self.tokens, self.loss_at_init))
        lr = apply_lr(self.optimizer, schedule_multiplier(step, cfg.train.steps, cfg.schedule))
        x, y = self.batch("train", self.data_position)
        for observer in self.observers:
            observer.on_batch(self, step, x, y)
        self.data_position += 1

        collect = logging_step and (cfg.train.stats_every == 0 or step % cfg.train.stats_every == 0)
        with self.autocast():
            out = self.forward(x, y, z_loss=cfg.loss.z_loss, ignore_index=cfg.loss.ignore_index,
                               collect_stats=collect)
        out.loss.backward()
        row: dict[str, float] = {}
        if logging_step:
            row.update(diagnostics.grad_stats(self.model))
        params = list(self.model.parameters())
        # ZClip measures the raw norm and applies optim.grad_clip itself as the hard cap
        clip = 0.0 if isinstance(self.remedy, ZClip) else cfg.optim.grad_clip
        grad_norm = float(clip_grad_norm(params, clip))  # of the rank-averaged gradients
        loss = distributed.mean(out.ce_loss.item(), self.device)

        event = self._remedy_event(step, params, loss, grad_norm)
        acted = event is not None and event["kind"] in ("skip_step", "rollback")
        for observer in self.observers:  # before the divergence check: a diverging step is seen too
            observer.on_step_end(self, step, loss, grad_norm, event)
        if not acted:
            self._check_divergence(step, loss, grad_norm)

        self.tokens += self.tokens_per_step
        self.throughput.add(self.tokens_per_step)
        if acted:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            if logging_step:
                self.updates.before()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if event is not None and event["kind"] == "rollback":
            # the spike's own row ends the abandoned branch, then the event marks where the
            # branch ends: the reader (records.split_branches) relies on that order
            if logging_step:
                self.log_row(step, self._log_row_fields(row, out, lr, loss, grad_norm, collect))
            self._record_event(event)
            restored = self.remedy.restore(self.model, self.optimizer)
            self.step, self.data_position = restored.step, restored.data_position
            self.tokens, self.loss_at_init = restored.extra_state
            self._drop_checkpoints_after(restored.step)
            return {}
        self.step = step + 1

        self._recent_train_losses = (self._recent_train_losses + [loss])[-cfg.train.log_every:]
        if not logging_step:
            return {}
        return self._log_row_fields(row, out, lr, loss, grad_norm, collect)

    def _log_row_fields(self, row: dict[str, float], out, lr: float, loss: float, grad_norm: float,
                        collect: bool) -> dict[str, float]:
        """The log row of a step: ``row`` (grad stats) plus updates, forward and data statistics."""
        row.update(self.updates.after())
        row.update(distributed.reduce_stats(diagnostics.forward_stats(out), self.device) if collect else {})
        row.update(getattr(self.source, "last_batch_info", {}))
        row.update({
            "tokens": self.tokens,
            "train/loss": loss,
            "train/z_loss": distributed.mean(out.z_loss.item(), self.device),
            "train/total_loss": distributed.mean(out.loss.item(), self.device),
            "optim/lr": lr,
            "optim/grad_norm": grad_norm,
        })
        row.update(self.throughput.read())
        return row

    def _remedy_event(self, step: int, params: list, loss: float, grad_norm: float) -> Optional[dict]:
        if self.remedy is None:
            return None
        if isinstance(self.remedy, ZClip):
            event = self.remedy.clip(params, grad_norm, step)
        elif isinstance(self.remedy, Rollback):
            event = self.remedy.check(step, loss, grad_norm, self.data_position)
        else:
            event = self.remedy.check(step, loss, grad_norm)
        if event is None:
            self._consecutive_skips = 0
            return None
        if event["kind"] != "rollback":  # a rollback is recorded after its step's row
            self._record_event(event)
        if event["kind"] == "skip_step":
            self._consecutive_skips += 1
            limit = self.cfg.remedy.max_consecutive_skips
            if limit and self._consecutive_skips >= limit:
                raise Diverged(step, f"{limit} steps skipped in a row (remedy.max_consecutive_skips)")
        return event

    def _record_event(self, event: dict) -> None:
        fields = {k: v for k, v in event.items() if k not in ("step", "kind")}
        self.record.event(event["step"], event["kind"], **fields)
        self.wandb.log(event["step"], {f"remedy/{event['kind']}": 1})

    def _check_divergence(self, step: int, loss: float, grad_norm: float) -> None:
        reason = divergence_reason(loss, grad_norm, self.loss_at_init, self.cfg.train)
        if reason is not None:
            raise Diverged(step, reason)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Optional[Path]:
        if not self.dist.is_main:
            return None
        ckpt_dir = self.info.run_dir / CHECKPOINTS
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = ckpt_dir / f"step_{self.step:07d}.pt"
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "data_position": self.data_position,
            "tokens": self.tokens,
            "loss_at_init": self.loss_at_init,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "remedy": self.remedy.state_dict() if self.remedy is not None else {},
            "record_lines": self.record.lines,  # metrics.jsonl up to here: what a resume keeps
        }
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        for old in sorted(ckpt_dir.glob("step_*.pt"))[: -max(1, self.cfg.train.keep_checkpoints)]:
            old.unlink()
        return path

    def _drop_checkpoints_after(self, step: int) -> None:
        """After a rollback to ``step``: later checkpoints hold the abandoned branch, and a resume
        must not pick one of them up."""
        if not self.dist.is_main:
            return
        for path in (self.info.run_dir / CHECKPOINTS).glob("step_*.pt"):
            if int(path.stem.split("_")[1]) > step:
                path.unlink()

    def load_checkpoint(self, path: Path) -> Optional[int]:
        """Restore the state saved at ``path``; returns how many metrics.jsonl lines it covers."""
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.data_position = state["step"], state["data_position"]
        self.tokens, self.loss_at_init = state["tokens"], state["loss_at_init"]
        if self.remedy is not None and state.get("remedy"):
            self.remedy.load_state_dict(state["remedy"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng_cuda"]])
        return state.get("record_lines")

    # -- the loop ----------------------------------------------------------------------------
    def log_row(self, step: int, row: dict[str, Any]) -> None:
        self.record.log(step, row)
        self.wandb.log(step, row)
        if "attn/max_logit" in row:
            peak = max(self._stats_seen.get("attn/max_logit_peak", -math.inf), row["attn/max_logit"])
            self._stats_seen["attn/max_logit_peak"] = peak
        for key in ("attn/max_logit", "output/logit_mean"):
            if key in row:
                self._stats_seen[key] = row[key]

    def run(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        self._start_record()
        started = time.time() - self._wall_before
        progress = _progress(t.steps, t.progress and self.dist.is_main, self.info.run_name, self.step)
        try:
            while self.step < t.steps:
                step = self.step
                if step % t.eval_every == 0:
                    val = self.evaluate()
                    if self.loss_at_init is None:
                        self.loss_at_init = val
                        self.record.update(loss_at_init=val)
                    self.log_row(step, {"val/loss": val})
                logging_step = step % t.log_every == 0 or step == t.steps - 1
                row = self.train_step(step, logging_step)  # advances self.step (a rollback rewinds it)
                if row:
                    self.log_row(step, row)
                    _show(progress, row)
                if progress is not None:
                    progress.n = self.step
                    if row:
                        progress.refresh()
                if t.ckpt_every and self.step % t.ckpt_every == 0 and 0 < self.step < t.steps:
                    self.save_checkpoint()
        except Diverged as d:
            self.record.event(d.step, "diverged", reason=d.reason)
            log.warning("run diverged at step %d: %s", d.step, d.reason)
            return self._finish("diverged", started, diverged_at=d.step)
        finally:
            if progress is not None:
                progress.close()
            for observer in self.observers:
                observer.close(self)
        final_val = self.evaluate()
        self.log_row(t.steps, {"val/loss": final_val, "tokens": self.tokens})
        if t.save_final:
            self.save_checkpoint()
        return self._finish("completed", started, final_val=final_val)

    def _start_record(self) -> None:
        cfg = self.cfg
        if cfg.train.resume:
            ckpt = latest_checkpoint(self.info.run_dir)
            if ckpt is None:
                raise ConfigError(f"train.resume=true but {self.info.run_dir} has no checkpoint")
            lines = self.load_checkpoint(ckpt)
            self.record.truncate_after(self.step - 1, lines)
            log.info("resumed from %s at step %d", ckpt, self.step)
        self._wall_before = self.record.summary.get("wall_time_s", 0.0) if cfg.train.resume else 0.0
        atomic_write_text(self.info.run_dir / CONFIG, OmegaConf.to_yaml(OmegaConf.create(as_dict(cfg))))
        self.record.update(
            status="running",
            run_name=self.info.run_name,
            sweep_id=self.info.sweep_id,
            overrides=list(self.info.overrides),
            experiment=cfg.experiment,
            steps_planned=cfg.train.steps,
            lr=cfg.optim.lr,
            n_params=self.model.n_params(),
            n_params_non_embedding=self.model.n_params(non_embedding=True),
            device=str(self.device),
            started_at=self.record.summary.get("started_at", time.time()),
            data=self.source.describe(),
        )

    def _finish(self, status: str, started: float, diverged_at: Optional[int] = None,
                final_val: Optional[float] = None) -> dict[str, Any]:
        fields = summary_fields(status, self.step, self.tokens, time.time() - started, self._recent_train_losses,
                                self._stats_seen, self.record.summary.get("best_val_loss"), diverged_at, final_val)
        self.record.update(**fields)
        if isinstance(self.remedy, Rollback):
            self.remedy.close()  # its disk snapshots are of no use once the run has ended
        self.wandb.summary(fields)
        self.wandb.finish(failed=status == "failed")
        self.record.close()
        return self.record.summary


def _without_wandb(cfg: Config) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, wandb=dataclasses.replace(cfg.wandb, mode="disabled"))


def _progress(total: int, enabled: bool, name: str, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=name[:40], initial=initial, total=total, dynamic_ncols=True, leave=False, disable=None)


def _show(progress, row: dict[str, Any]) -> None:
    if progress is not None:
        progress.set_postfix(loss=f"{row['train/loss']:.3f}", lr=f"{row['optim/lr']:.2e}",
                             gnorm=f"{row['optim/grad_norm']:.2f}", refresh=False)


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
        if trainer.dist.is_main:
            (info.run_dir / "error.txt").write_text(traceback.format_exc())
        trainer.record.update(status="failed", error=f"{type(exc).__name__}: {exc}", steps_completed=trainer.step)
        trainer.wandb.finish(failed=True)
        trainer.record.close()
        raise
    finally:
        distributed.teardown()


# --------------------------------------------------------------------------------------------
# Hydra entry point
# --------------------------------------------------------------------------------------------
def run_name_from(overrides: list[str]) -> str:
    kept = [o for o in overrides if not o.lstrip("+~").startswith(NON_VARIANT_KEYS)]
    return ",".join(kept) or "default"


class _StderrGate:
    """Holds back stderr until the job starts, so a config error prints as one line.

    Hydra reports a bad override as a few lines plus a hint about HYDRA_FULL_ERROR; we keep the
    text and print its substance on one line. Once a job starts, stderr flows as usual.
    """

    def __init__(self):
        self.real = sys.stderr
        self.buffer = io.StringIO()
        self.open = False

    def __enter__(self):
        sys.stderr = self.buffer
        return self

    def release(self) -> None:
        if not self.open:
            self.open = True
            sys.stderr = self.real
            self.real.write(self.buffer.getvalue())

    def one_line(self) -> str:
        lines = [ln.strip() for ln in self.buffer.getvalue().splitlines() if ln.strip()]
        lines = [ln for ln in lines if "HYDRA_FULL_ERROR" not in ln and not ln.startswith("object_type")]
        return " ".join(lines)

    def __exit__(self, *exc):
        sys.stderr = self.real
        return False


_gate: Optional[_StderrGate] = None


def _hydra_task(dcfg) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if _gate is not None:
        _gate.release()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        cfg = to_config(dcfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(cfg.out_dir or hc.runtime.output_dir)
    sweep_id = Path(hc.sweep.dir).name if multirun else None
    name = cfg.run_name or run_name_from(list(hc.overrides.task))
    try:
        from proxy.ensemble import sweep_requested, train_ensemble

        if sweep_requested(cfg):  # sweep.lrs=[...]: K members vectorized in this one process
            members = train_ensemble(cfg, run_dir, name, sweep_id, tuple(hc.overrides.task))
            for member in members:
                print(f"{member['status']}: {member.get('run_name')}")
            return None
        summary = train(cfg, run_dir, name, sweep_id, tuple(hc.overrides.task))
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # recorded as failed in summary.json, traceback in error.txt
        print(f"error: run failed: {type(exc).__name__}: {exc} (traceback in {run_dir}/error.txt)",
              file=sys.stderr)
        if not multirun:
            sys.exit(1)
        return None  # a multirun goes on to its next job
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{summary['status']}: {name} -> {summary.get('run_dir', run_dir)}")
    return summary.get("final_val_loss")


def _quiet_non_zero_ranks() -> None:
    """Under torchrun, ranks > 0 get a throw-away Hydra dir: rank 0's run dir is the record."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if rank == 0:
        return
    import tempfile

    extra = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    if not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]):
        extra.append(f"hydra.run.dir={tempfile.mkdtemp(prefix='proxy-rank{rank}-')}")
    sys.argv += extra


def main() -> None:
    """``proxy-train``: Hydra over conf/config.yaml; see ``proxy-train --help``."""
    global _gate
    import hydra

    from proxy.config import register_configs

    register_configs()
    _quiet_non_zero_ranks()
    entry = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")(_hydra_task)
    _gate = _StderrGate()
    with _gate:
        try:
            entry()
        except SystemExit as exc:
            if not _gate.open and exc.code not in (0, None):
                _gate.real.write(f"error: {_gate.one_line()}\n")
                raise SystemExit(2) from None
            _gate.release()
            raise
    _gate.release()


if __name__ == "__main__":
    main()
