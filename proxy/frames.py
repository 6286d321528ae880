"""Run directories as pandas DataFrames, for notebooks: ``load_frames("runs/sweeps/...")``.

Reads through :func:`proxy.records.load_run` (the report's reader), so rolled-back rows and
events are set apart exactly as the report sets them apart. Four frames, joined on ``run``:

    runs       one row per run: run, path, status, the summary's scalar fields, and the config
               flattened under ``config.<dotted key>`` (``config.optim.lr``, ...)
    metrics    one row per logged step a run kept: run, step, then the metric keys of
               metrics.jsonl (proxy/records.py) as columns
    events     one row per event (skip-step, rollback, divergence, spike kit, ...): run, step,
               event, rolled_back, and the event's own fields
    abandoned  the rows a rollback threw away: run, branch (0, 1, ... per run), rollback_step
               (the spike's step), step, and the metric columns

``run`` is the run's name (its overrides), or its path relative to the folders given where two
runs share a name. pandas is an optional extra: ``pip install 'proxy[pandas]'``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from proxy.records import EVENT, STEP, Run, find_runs, load_run

if TYPE_CHECKING:
    import pandas as pd

PANDAS_MISSING = "proxy.frames needs pandas: pip install 'proxy[pandas]' (or pip install pandas)"
RUN = "run"  # the column that names a run in every frame
CONFIG_PREFIX = "config."


@dataclass
class RunFrames:
    runs: "pd.DataFrame"
    metrics: "pd.DataFrame"
    events: "pd.DataFrame"
    abandoned: "pd.DataFrame"


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError(PANDAS_MISSING) from None
    return pandas


def load_frames(*paths: str | Path) -> RunFrames:
    """Every run directory at or below ``paths`` (run dirs, sweep dirs, ``runs/``) as DataFrames."""
    pd = _pandas()
    runs = [load_run(p) for p in find_runs(paths)]
    ids = run_ids(runs)
    return RunFrames(
        runs=_frame(pd, [run_row(ids[i], run) for i, run in enumerate(runs)], [RUN, "path", "status"]),
        metrics=_frame(pd, [{RUN: ids[i], **row} for i, run in enumerate(runs) for row in run.metrics], [RUN, STEP]),
        events=_frame(
            pd,
            [{RUN: ids[i], **_event_row(e)} for i, run in enumerate(runs) for e in run.events],
            [RUN, STEP, EVENT, "rolled_back"],
        ),
        abandoned=_frame(
            pd,
            [
                {RUN: ids[i], "branch": b, "rollback_step": branch.rollback.get(STEP), **row}
                for i, run in enumerate(runs)
                for b, branch in enumerate(run.abandoned)
                for row in branch.rows
            ],
            [RUN, "branch", "rollback_step", STEP],
        ),
    )


def run_ids(runs: list[Run]) -> list[str]:
    """Each run's name; where names repeat, the path relative to the runs' common folder."""
    names = [run.name for run in runs]
    if len(set(names)) == len(names):
        return names
    paths = [str(run.path) for run in runs]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return [os.path.relpath(p, root) for p in paths]


def run_row(run_id: str, run: Run) -> dict[str, Any]:
    """A run's row of the ``runs`` frame: the summary's scalars, then the flattened config."""
    row: dict[str, Any] = {RUN: run_id, "path": str(run.path), "status": run.status}
    for key, value in run.summary.items():
        if key not in row and _scalar(value):
            row[key] = value
    row["overrides"] = " ".join(run.overrides)
    row.update({CONFIG_PREFIX + k: v for k, v in flatten(run.config).items()})
    return row


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; lists become their string."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value if _scalar(value) else str(value)
    return flat


def _event_row(event: dict[str, Any]) -> dict[str, Any]:
    return {**event, "rolled_back": bool(event.get("rolled_back", False))}


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _frame(pd, rows: Iterable[dict[str, Any]], first: list[str]) -> "pd.DataFrame":
    """A frame of ``rows`` whose leading columns are ``first`` (present even when empty)."""
    frame = pd.DataFrame(list(rows))
    rest = [c for c in frame.columns if c not in first]
    return frame.reindex(columns=first + rest)


__all__ = ["RunFrames", "flatten", "load_frames", "run_ids", "run_row"]
