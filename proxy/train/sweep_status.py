"""A multirun's progress in one line: ``sweep: 3/8 runs done (2 completed, 1 diverged), 1m52s
elapsed, ETA 3m05s``.

Read from the sweep directory alone, so it holds for any launcher (jobs in this process, joblib
workers, SLURM tasks sharing a file system): the number of jobs planned comes from Hydra's
``multirun.yaml`` (the basic sweeper's grid: its params and the command-line overrides), a job
is done when every run record under its folder has left ``running``, and the sweep started when
Hydra wrote ``multirun.yaml``. The ETA assumes the remaining jobs take as long as the done ones
did, over as many jobs at a time as are running when it is said.

When the multirun ends, :class:`SweepEnd` (a Hydra callback, conf/config.yaml) prints the sweep
folder, how its runs ended and the next command: the report, or the finding's verdict.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from proxy.analysis import MIN_SEEDS
from proxy.records import CONFIG, RUNNING, STATUSES, SUMMARY, UNKNOWN, read_json, read_yaml

MULTIRUN_FILE = "multirun.yaml"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


@dataclass
class SweepProgress:
    done: int
    planned: Optional[int]  # None: not a grid this module can count
    statuses: Counter
    elapsed_s: float
    running: int = 0  # jobs started and not done
    job_s: Optional[float] = None  # the mean wall time of a done job (its longest run record)

    def line(self, eta: bool = True) -> str:
        of = f"/{self.planned}" if self.planned else ""
        counts = ", ".join(f"{n} {status}" for status, n in sorted(self.statuses.items()))
        text = f"sweep: {self.done}{of} runs done" + (f" ({counts})" if counts else "")
        text += f", {duration(self.elapsed_s)} elapsed"
        if eta and self.planned and 0 < self.done < self.planned:
            text += f", ETA {duration(self.eta_s())}"
        return text

    def eta_s(self) -> float:
        """The remaining jobs at the done jobs' mean time, as many at a time as run now plus the
        slot the last done job freed (1 under the sequential launcher, n_jobs under joblib)."""
        assert self.planned is not None
        per_job = self.job_s if self.job_s is not None else self.elapsed_s / max(1, self.done)
        at_a_time = max(1, self.running + 1)
        return per_job * (self.planned - self.done) / at_a_time


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


def _job_statuses(job_dir: Path) -> tuple[list[str], Optional[float]]:
    """The statuses of the run records of one job (its own, or its ensemble members', one level
    down) and the longest wall time among them."""
    summaries = [job_dir / SUMMARY] if (job_dir / SUMMARY).is_file() else sorted(job_dir.glob(f"*/{SUMMARY}"))
    statuses, walls = [], []
    for path in summaries:
        try:
            stored = read_json(path)
        except (OSError, ValueError):  # being rewritten, or torn: not done yet
            stored = {"status": RUNNING}
        status = stored.get("status", UNKNOWN)
        statuses.append(status if status in (*STATUSES, UNKNOWN) else UNKNOWN)  # a foreign file: no text of it
        wall = stored.get("wall_time_s")
        if isinstance(wall, (int, float)) and not isinstance(wall, bool) and wall >= 0:
            walls.append(float(wall))
    return statuses, max(walls, default=None)


def sweep_progress(sweep_dir: Path, now: Optional[float] = None) -> Optional[SweepProgress]:
    """The progress of the multirun in ``sweep_dir``; None if it is not one (no multirun.yaml)."""
    sweep_dir = Path(sweep_dir)
    marker = sweep_dir / MULTIRUN_FILE
    if not marker.is_file():
        return None
    done, running, statuses, walls = 0, 0, Counter[str](), []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        job_statuses, wall = _job_statuses(job)
        if job_statuses and RUNNING not in job_statuses:
            done += 1
            statuses.update(job_statuses)
            if wall is not None:
                walls.append(wall)
        elif job_statuses:
            running += 1
    elapsed = (now if now is not None else time.time()) - marker.stat().st_mtime
    planned = planned_jobs(sweep_dir)
    job_s = sum(walls) / len(walls) if walls and len(walls) == done else None
    return SweepProgress(min(done, planned) if planned else done, planned, statuses, elapsed, running, job_s)


_last_done: dict[Path, int] = {}  # per sweep, what this process last reported


def new_line(sweep_dir: Path) -> Optional[str]:
    """The sweep's line when more jobs are done than this process last said (so an ensemble's
    members, finishing one after another, add one line, not one each)."""
    progress = sweep_progress(sweep_dir)
    if progress is None or progress.done <= _last_done.get(Path(sweep_dir), 0):
        return None
    _last_done[Path(sweep_dir)] = progress.done
    return progress.line()


def sweep_seeds(sweep_dir: Path) -> set[int]:
    """The training seeds of the sweep's runs, read from their stored configs (empty where none
    says; a config that cannot be read is left out, not trusted)."""
    seeds = set()
    for path in [*Path(sweep_dir).glob(f"*/{CONFIG}"), *Path(sweep_dir).glob(f"*/*/{CONFIG}")]:
        try:
            config = read_yaml(path)
        except (OSError, ValueError):
            continue
        seed = (config.get("train") or {}).get("seed") if isinstance(config, dict) else None
        if isinstance(seed, int) and not isinstance(seed, bool):
            seeds.add(seed)
    return seeds


def next_command(sweep_dir: Path, experiment: Optional[str], root: Optional[Path] = None) -> str:
    """What to run on a finished sweep: the finding's verdict where ``experiments/<experiment>/``
    has one (run from the repository), else the report; the report first when the sweep has
    fewer seeds than a verdict judges (a class's one-seed run), with the verdict's need said."""
    root = root if root is not None else Path.cwd()
    if experiment and (root / "experiments" / experiment / "verdict.py").is_file():
        seeds = sweep_seeds(sweep_dir)
        if 0 < len(seeds) < MIN_SEEDS:
            return (
                f"proxy-report {sweep_dir}  (curves and numbers; proxy-verdict experiments/{experiment} judges "
                f"{MIN_SEEDS} seeds or more, this sweep has {len(seeds)})"
            )
        return f"proxy-verdict experiments/{experiment} {sweep_dir}"
    return f"proxy-report {sweep_dir}"


def end_lines(sweep_dir: Path, experiment: Optional[str], root: Optional[Path] = None) -> list[str]:
    """What a finished multirun prints: where it is, how its runs ended, what to run next."""
    progress = sweep_progress(sweep_dir)
    lines = [f"sweep folder: {sweep_dir}"]
    if progress is not None:
        lines.append(progress.line(eta=False))
    lines.append(f"next: {next_command(sweep_dir, experiment, root)}")
    return lines


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # the device image has no Hydra: nothing there ends a multirun
    _HydraCallback = object  # type: ignore[assignment, misc]


class SweepEnd(_HydraCallback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): at the end of a multirun, the sweep
    folder and the next command, so nobody digs the date out of a run path."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        from proxy.records import terminal_text

        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            experiment = config.get("experiment")
        except Exception:  # a config without these keys: nothing to say
            return
        for line in end_lines(sweep_dir, str(experiment) if experiment else None):
            print(terminal_text(line), flush=True)


__all__ = [
    "SweepEnd",
    "end_lines",
    "next_command",
    "SweepProgress",
    "current_sweep_dir",
    "duration",
    "new_line",
    "planned_jobs",
    "sweep_progress",
]
