"""A multirun's progress in one line: ``sweep: 3/8 runs done (2 completed, 1 diverged), 1m52s
elapsed, ETA 3m05s``.

Read from the sweep directory alone, so it holds for any launcher (jobs in this process, joblib
workers, SLURM tasks sharing a file system): the number of jobs planned comes from Hydra's
``multirun.yaml`` (the basic sweeper's grid: its params and the command-line overrides), a job
is done when every run record under its folder has left ``running``, and the sweep started when
Hydra wrote ``multirun.yaml``. The ETA assumes the remaining jobs take as long as the done ones
did, at the same parallelism.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from proxy.records import RUNNING, STATUSES, SUMMARY, UNKNOWN, read_json

MULTIRUN_FILE = "multirun.yaml"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class SweepProgress:
    done: int
    planned: Optional[int]  # None: not a grid this module can count
    statuses: Counter
    elapsed_s: float

    def line(self) -> str:
        of = f"/{self.planned}" if self.planned else ""
        counts = ", ".join(f"{n} {status}" for status, n in sorted(self.statuses.items()))
        text = f"sweep: {self.done}{of} runs done" + (f" ({counts})" if counts else "")
        text += f", {duration(self.elapsed_s)} elapsed"
        if self.planned and 0 < self.done < self.planned:
            text += f", ETA {duration(self.elapsed_s / self.done * (self.planned - self.done))}"
        return text


def duration(seconds: float) -> str:
    """42 -> '42s', 185 -> '3m05s', 3720 -> '1h02m'."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def current_sweep_dir() -> Optional[Path]:
    """The sweep directory of the Hydra multirun this process runs a job of, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None
    except Exception:  # no Hydra, or a config without these keys: no sweep line
        return None


def planned_jobs(sweep_dir: Path) -> Optional[int]:
    """How many jobs the basic sweeper's grid in ``multirun.yaml`` has; None where it cannot say."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        hydra = OmegaConf.load(Path(sweep_dir) / MULTIRUN_FILE).hydra
        if hydra.sweeper.get("_target_") != BASIC_SWEEPER:
            return None
        params = [f"{k}={v}" for k, v in (hydra.sweeper.get("params") or {}).items()]
        parsed = OverridesParser.create().parse_overrides(params + list(hydra.overrides.task))
        return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
    except Exception:  # a file of another Hydra version, a sweep syntax the basic parser lacks
        return None


def _job_statuses(job_dir: Path) -> list[str]:
    """The statuses of the run records of one job: its own, or its ensemble members' (one level down)."""
    summaries = [job_dir / SUMMARY] if (job_dir / SUMMARY).is_file() else sorted(job_dir.glob(f"*/{SUMMARY}"))
    statuses = []
    for path in summaries:
        try:
            status = read_json(path).get("status", UNKNOWN)
        except (OSError, ValueError):  # being rewritten, or torn: not done yet
            status = RUNNING
        statuses.append(status if status in (*STATUSES, UNKNOWN) else UNKNOWN)  # a foreign file: no text of it
    return statuses


def sweep_progress(sweep_dir: Path, now: Optional[float] = None) -> Optional[SweepProgress]:
    """The progress of the multirun in ``sweep_dir``; None if it is not one (no multirun.yaml)."""
    sweep_dir = Path(sweep_dir)
    marker = sweep_dir / MULTIRUN_FILE
    if not marker.is_file():
        return None
    done, statuses = 0, Counter[str]()
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        job_statuses = _job_statuses(job)
        if job_statuses and RUNNING not in job_statuses:
            done += 1
            statuses.update(job_statuses)
    elapsed = (now if now is not None else time.time()) - marker.stat().st_mtime
    planned = planned_jobs(sweep_dir)
    return SweepProgress(min(done, planned) if planned else done, planned, statuses, elapsed)


_last_done: dict[Path, int] = {}  # per sweep, what this process last reported


def new_line(sweep_dir: Path) -> Optional[str]:
    """The sweep's line when more jobs are done than this process last said (so an ensemble's
    members, finishing one after another, add one line, not one each)."""
    progress = sweep_progress(sweep_dir)
    if progress is None or progress.done <= _last_done.get(Path(sweep_dir), 0):
        return None
    _last_done[Path(sweep_dir)] = progress.done
    return progress.line()


__all__ = ["SweepProgress", "current_sweep_dir", "duration", "new_line", "planned_jobs", "sweep_progress"]
