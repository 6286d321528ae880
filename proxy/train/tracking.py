"""The sinks: where a run's rows go besides metrics.jsonl. The run ledger (proxy/train/ledger.py)
owns one :class:`Sinks` per run (an ensemble's members each own one, open at the same time:
``concurrent=True``) and hands every row to it, under the keys of metrics.jsonl:

    WandbSink        wandb (wandb.mode=offline | online), writing under the run directory
    TensorBoardSink  TensorBoard event files in <run_dir>/tensorboard (tensorboard.enabled=true)
    LogSink          the run's key lines (start, evals, end; after each run of a multirun, the
                     sweep's progress) to the ``proxy.train`` logger: Hydra's job log
                     <run_dir>/train.log and its console

A sink has four calls: ``started(summary)`` once the record is written, ``log(step, row)``,
``summary(fields)`` with the final fields, ``finish(failed)``.

wandb is imported only when its mode is not ``disabled``, and writes under the run directory,
never $HOME, so offline runs can be synced later with ``wandb sync <run_dir>/wandb``. Every row
carries the trainer's step as the metric ``trainer/step``, the x-axis of every chart, instead of
wandb's own step counter: a rollback re-runs steps, and wandb drops a row logged at a ``step=``
lower than one it has seen, so the replayed steps would be lost. TensorBoard takes the trainer's
step as its ``global_step`` (the same axis); a resume purges what the run logged after its
checkpoint, as metrics.jsonl does.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Protocol, TypeGuard

from proxy.config import Config, ConfigError, WandbMode, as_dict
from proxy.records import COMPLETED, DIVERGED, STEP, TENSORBOARD_DIR, TRAIN_LOSS, VAL_LOSS, WANDB_DIR, WANDB_STEP
from proxy.train import sweep_status

STEP_METRIC = WANDB_STEP

log = logging.getLogger("proxy.train")


class Sink(Protocol):
    def started(self, summary: dict[str, Any]) -> None: ...

    def log(self, step: int, row: dict[str, Any]) -> None: ...

    def summary(self, fields: dict[str, Any]) -> None: ...

    def finish(self, failed: bool = False) -> None: ...


class WandbSink:
    def __init__(self, cfg: Config, run_dir: Path, run_name: str, group: Optional[str], concurrent: bool = False):
        self.run = None
        if cfg.wandb.mode == WandbMode.disabled:
            return
        import wandb

        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir / WANDB_DIR / "cache"))
        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            group=cfg.wandb.group or group,
            name=run_name,
            tags=list(cfg.wandb.tags),
            mode=cfg.wandb.mode.value,
            dir=str(run_dir),
            config=as_dict(cfg),
            # one run per process finishes the previous one; K ensemble members log side by side
            reinit="create_new" if concurrent else "finish_previous",
        )
        self.run.define_metric(STEP_METRIC)
        self.run.define_metric("*", step_metric=STEP_METRIC)

    def started(self, summary: dict[str, Any]) -> None:
        pass

    def log(self, step: int, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({STEP_METRIC: step, **{k: v for k, v in row.items() if k != STEP}})

    def summary(self, fields: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in fields.items():
                if isinstance(v, (int, float, str)) or v is None:
                    self.run.summary[k] = v

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


TENSORBOARD_MISSING = (
    "tensorboard.enabled=true needs the tensorboard package: "
    "pip install 'proxy[tensorboard]' (or pip install tensorboard)"
)


class TensorBoardSink:
    """Scalars under the metrics.jsonl keys at the trainer's step; the final summary as text."""

    def __init__(self, run_dir: Path, resume_step: Optional[int] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(TENSORBOARD_MISSING) from None
        # purge_step: a resume hides what the previous process logged from the checkpoint on
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=resume_step)

    def started(self, summary: dict[str, Any]) -> None:
        pass

    def log(self, step: int, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != STEP and _is_number(value):
                self.writer.add_scalar(key, float(value), global_step=step)

    def summary(self, fields: dict[str, Any]) -> None:
        lines = [f"| {k} | {v} |" for k, v in fields.items() if _is_number(v) or isinstance(v, str)]
        self.writer.add_text(
            "summary",
            "\n".join(["| field | value |", "| --- | --- |", *lines]),
            global_step=fields.get("steps_completed"),
        )

    def finish(self, failed: bool = False) -> None:
        self.writer.close()


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class LogSink:
    """The run's key lines, to the ``proxy.train`` logger (which Hydra writes to train.log and
    the console): the start, each eval's val loss, the end; and at the end of a run of a
    multirun, the sweep's line (runs done of N, ETA: proxy/train/sweep_status.py)."""

    def __init__(
        self,
        run_name: str,
        run_dir: Path,
        steps_planned: int,
        resume_step: Optional[int] = None,
        sweep_dir: Optional[Path] = None,
        concurrent: bool = False,
    ):
        self.name, self.dir, self.steps = run_name, run_dir, steps_planned
        self.resume_step, self.sweep_dir = resume_step, sweep_dir
        self.prefix = f"{run_name}: " if concurrent else ""  # an ensemble's members log side by side
        self.train_loss: Optional[float] = None

    def started(self, summary: dict[str, Any]) -> None:
        log.info(start_line(self.name, self.dir, summary, self.resume_step))

    def log(self, step: int, row: dict[str, Any]) -> None:
        if TRAIN_LOSS in row:
            self.train_loss = row[TRAIN_LOSS]
        if VAL_LOSS in row:
            train = f" (last logged train loss {self.train_loss:.4f})" if self.train_loss is not None else ""
            log.info("%sstep %d/%d: val loss %.4f%s", self.prefix, step, self.steps, row[VAL_LOSS], train)

    def summary(self, fields: dict[str, Any]) -> None:
        log.info(end_line(self.name, fields))

    def finish(self, failed: bool = False) -> None:
        if failed:
            log.error("end %s: failed", self.name)
        if self.sweep_dir is not None:
            line = sweep_status.new_line(self.sweep_dir)
            if line:
                log.info(line)


def start_line(name: str, run_dir: Path, summary: dict[str, Any], resume_step: Optional[int] = None) -> str:
    """'start NAME: 0.12M params on cpu, 400 steps at lr 0.01 -> DIR' ('resume NAME at step S: ...')."""
    params = summary.get("n_params")
    size = f"{params / 1e6:.2f}M params" if _is_number(params) else "? params"
    head = f"start {name}" if resume_step is None else f"resume {name} at step {resume_step}"
    return (
        f"{head}: {size} on {summary.get('device', '?')}, {summary.get('steps_planned', '?')} steps at "
        f"lr {summary.get('lr', '?')} -> {run_dir}"
    )


def end_line(name: str, fields: dict[str, Any]) -> str:
    """'end NAME: completed after 400 steps, val loss 3.9120, 21 s' (diverged: at which step)."""
    status = fields.get("status", "?")
    parts = [f"end {name}: {status}"]
    if status == DIVERGED and fields.get("diverged_at_step") is not None:
        parts.append(f"at step {fields['diverged_at_step']}")
    parts.append(f"after {fields.get('steps_completed', '?')} steps")
    text = " ".join(parts)
    val = fields.get("final_val_loss")
    if status == COMPLETED and _is_number(val) and math.isfinite(val):
        text += f", val loss {val:.4f}"
    if _is_number(fields.get("wall_time_s")):
        text += f", {sweep_status.duration(fields['wall_time_s'])}"
    return text


class Sinks:
    """Every sink of a run, called in turn."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def started(self, summary: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.started(summary)

    def log(self, step: int, row: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(step, row)

    def summary(self, fields: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.summary(fields)

    def finish(self, failed: bool = False) -> None:
        for sink in self.sinks:
            sink.finish(failed=failed)


def open_sinks(
    cfg: Config,
    run_dir: Path,
    run_name: str,
    group: Optional[str],
    *,
    main: bool = True,
    concurrent: bool = False,
    resume_step: Optional[int] = None,
) -> Sinks:
    """The sinks ``cfg`` asks for. Only the main process of a data-parallel run has any: the
    other ranks' rows are the same numbers. ConfigError (one line) where a package is missing."""
    if not main:
        return Sinks([])
    sinks: list[Sink] = [
        LogSink(
            run_name,
            Path(run_dir),
            cfg.train.steps,
            resume_step,
            sweep_status.current_sweep_dir(),
            concurrent=concurrent,
        )
    ]
    if cfg.tensorboard.enabled:
        sinks.append(TensorBoardSink(run_dir, resume_step))
    if cfg.wandb.mode != WandbMode.disabled:
        sinks.append(WandbSink(cfg, run_dir, run_name, group, concurrent=concurrent))
    return Sinks(sinks)


__all__ = ["LogSink", "Sink", "Sinks", "TensorBoardSink", "WandbSink", "end_line", "open_sinks", "start_line"]
