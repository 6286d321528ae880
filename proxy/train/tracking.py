"""The wandb sink: the metrics the loop logs (the same keys as metrics.jsonl), mirrored to wandb.

wandb is imported only when its mode is not ``disabled``, and writes under the run directory,
never $HOME, so offline runs can be synced later with ``wandb sync <run_dir>/wandb``. The run
ledger (proxy/train/ledger.py) owns one sink per run; an ensemble's members each own one, open at
the same time (``concurrent=True``).

Every row carries the trainer's step as the metric ``trainer/step``, the x-axis of every chart,
instead of wandb's own step counter: a rollback re-runs steps, and wandb drops a row logged at a
``step=`` lower than one it has seen, so the replayed steps would be lost.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from proxy.config import Config, WandbMode, as_dict
from proxy.records import STEP, WANDB_STEP

STEP_METRIC = WANDB_STEP


class WandbSink:
    def __init__(self, cfg: Config, run_dir: Path, run_name: str, group: Optional[str],
                 concurrent: bool = False):
        self.run = None
        if cfg.wandb.mode == WandbMode.disabled:
            return
        import wandb

        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir / "wandb" / "cache"))
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
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
