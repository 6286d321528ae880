"""The reader side of a run directory: :func:`load_run`, what the report and the verdicts read.

A run directory may have been copied from anywhere, so nothing in it is trusted: every file is
read without following a link and bounded in size (proxy/records/files.py), and a file that is
not what proxy writes makes that one run ``unreadable`` (:attr:`Run.error` says why, in one
line) instead of stopping the report of the whole sweep. A torn last line of metrics.jsonl (a
run killed mid-write) is left out, as it always was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from proxy.records.files import (
    StoredFileError,
    UnsafePathError,
    _first_line,
    open_untrusted,
    plain_json,
    read_json,
    read_yaml,
)
from proxy.records.keys import (
    CHECKPOINTS,
    CONFIG,
    EVENT,
    KITS_DIR,
    METRICS,
    ROLLBACK,
    ROLLBACK_DIR,
    STATE_NAME,
    STEP,
    SUMMARY,
    TENSORBOARD_DIR,
    UNREADABLE,
    WANDB_DIR,
)
from proxy.records.summary import Summary

LINE_MAX_BYTES = 16 << 20  # one metrics row: a few kB (a 100-layer model's per-parameter statistics: ~1 MB)
MAX_STEP = 10**12  # more optimizer steps than any run takes
HYDRA_DIR = ".hydra"


@dataclass
class Branch:
    """Steps a rollback threw away: the rows logged from ``rollback["restore_step"]`` up to the
    spike at ``rollback["step"]``, which the run then re-ran from its snapshot, and the events
    that happened on them (``rollback`` itself ends the branch)."""

    rollback: dict[str, Any]
    rows: list[dict[str, Any]]
    events: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        return _series(self.rows, key)


@dataclass
class Run:
    """A run directory as the report sees it.

    ``metrics`` is the trajectory the run kept: one row per logged step, rolled-back rows moved
    to ``abandoned``. ``events`` holds every event in order; those that happened on an abandoned
    branch carry ``rolled_back: True``. ``error``: why the run dir could not be read (its status
    is then ``unreadable`` and it holds nothing else).
    """

    path: Path
    summary: Summary
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    abandoned: list[Branch] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def status(self) -> str:
        return UNREADABLE if self.error is not None else self.summary.status

    @property
    def name(self) -> str:
        return self.summary.run_name or self.path.name

    @property
    def overrides(self) -> list[str]:
        """The run's command-line overrides: from its summary, else (a run whose summary was
        lost) from Hydra's .hydra/overrides.yaml beside it."""
        if self.summary.overrides is not None:
            return list(self.summary.overrides)
        hydra = self.path / HYDRA_DIR / "overrides.yaml"
        if self.error is None and hydra.is_file():
            try:
                stored = read_yaml(hydra)
            except (StoredFileError, UnsafePathError, OSError):  # a torn or foreign file: no overrides
                return []
            return [str(o) for o in stored] if isinstance(stored, list) else []
        return []

    def config_value(self, dotted: str) -> Any:
        """A value of the run's config by dotted key (``"data.inject.enabled"``); None if absent."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric key over the kept steps that have it."""
        return _series(self.metrics, key)

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.metrics:
            for k in row:
                seen.setdefault(k, None)
        return list(seen)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(row[STEP])
            values.append(float(value))
    return steps, values


def split_branches(rows: Iterable[dict[str, Any]]) -> tuple[list[dict], list[dict], list[Branch]]:
    """(kept metric rows, events, abandoned branches) from metrics.jsonl rows in file order."""
    metrics: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    abandoned: list[Branch] = []
    for row in rows:
        if EVENT not in row:
            metrics.append(row)
            continue
        restore = row.get("restore_step")
        if row[EVENT] == ROLLBACK and isinstance(restore, (int, float)) and not isinstance(restore, bool):
            thrown = [e for e in events if e[STEP] >= restore and not e.get("rolled_back")]
            for earlier in thrown:
                earlier["rolled_back"] = True
            abandoned.append(Branch(row, [r for r in metrics if r[STEP] >= restore], thrown))
            metrics = [r for r in metrics if r[STEP] < restore]
        events.append(row)
    return metrics, events, abandoned


def is_run_dir(path: str | Path) -> bool:
    """A run directory has a summary.json, or at least a metrics.jsonl (its summary was lost)."""
    return (Path(path) / SUMMARY).is_file() or (Path(path) / METRICS).is_file()


_NOT_RUNS = (CHECKPOINTS, KITS_DIR, ROLLBACK_DIR, TENSORBOARD_DIR, WANDB_DIR, HYDRA_DIR)  # folders inside a run


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Every run directory at or below the given paths, sorted, without duplicates. A
    summary.json or metrics.jsonl that is not a plain file (a folder, a link) still marks a run
    dir: :func:`load_run` then says what is wrong with it."""
    found: dict[Path, None] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"no such run directory: {p}")
        if is_run_dir(p) or (p / SUMMARY).is_symlink() or (p / SUMMARY).is_dir():
            found.setdefault(p.resolve(), None)
        for marker in sorted([*p.rglob(SUMMARY), *p.rglob(METRICS)]):
            if any(part in _NOT_RUNS for part in marker.relative_to(p).parts):
                continue
            found.setdefault(marker.parent.resolve(), None)
    return sorted(found)


# --------------------------------------------------------------------------------------------
# load_run: every file checked, one bad run dir unreadable rather than a report brought down
# --------------------------------------------------------------------------------------------
def _summary(path: Path) -> Summary:
    if not (path / SUMMARY).exists() and not (path / SUMMARY).is_symlink():
        return Summary()
    return Summary.of(read_json(path / SUMMARY), str(path / SUMMARY))


def _config(path: Path) -> dict[str, Any]:
    for candidate in (path / CONFIG, path / HYDRA_DIR / CONFIG):
        if candidate.exists() or candidate.is_symlink():
            config = read_yaml(candidate)
            if config is None:
                return {}
            if not isinstance(config, dict):
                raise StoredFileError(f"{candidate} holds a YAML {type(config).__name__}, not a mapping")
            return config
    return {}


def _metric_rows(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl read line by line (memory: the rows, not the file), each line checked."""
    mpath = path / METRICS
    if not mpath.exists() and not mpath.is_symlink():
        return []
    rows = []
    pending: Optional[tuple[int, str]] = None  # a line that did not parse: fine only if it is the last
    with open_untrusted(mpath) as f:
        for number, raw in enumerate(iter(lambda: f.readline(LINE_MAX_BYTES + 1), b""), start=1):
            if len(raw) > LINE_MAX_BYTES:
                raise StoredFileError(f"{mpath}: line {number} is longer than {LINE_MAX_BYTES:,} bytes")
            line = raw.decode("utf-8", errors="replace").strip()
            if not line:
                continue
            if pending is not None:
                raise StoredFileError(f"{mpath}: line {pending[0]} is not valid JSON")
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                pending = (number, line)  # a run killed mid-write leaves a torn last line
                continue
            rows.append(_row(row, f"{mpath}: line {number}"))
    return rows


def _row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise StoredFileError(f"{where} is a JSON {type(row).__name__}, not an object")
    step = row.get(STEP)
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < MAX_STEP:
        raise StoredFileError(f"{where} has no integer step (0 <= step < {MAX_STEP:.0e})")
    if EVENT in row and not isinstance(row[EVENT], str):
        raise StoredFileError(f"{where} has an event that is not a string")
    return plain_json(row, where)


def load_run(path: str | Path) -> Run:
    """A run directory as the report sees it. A missing summary.json leaves the run listed with
    status ``unknown`` (its metrics and config still count); a file that is not what proxy
    writes (a link, a folder, torn or foreign JSON or YAML, an interpolation, an alias bomb)
    leaves it ``unreadable``, with the reason in :attr:`Run.error`."""
    path = Path(path)
    try:
        summary = _summary(path)
        config = _config(path)
        rows = _metric_rows(path)
    except (StoredFileError, UnsafePathError, OSError, RecursionError) as exc:
        return Run(path=path, summary=Summary(), config={}, error=_first_line(exc))
    metrics, events, abandoned = split_branches(rows)
    return Run(path=path, summary=summary, config=config, metrics=metrics, events=events, abandoned=abandoned)


# --------------------------------------------------------------------------------------------
# State files: checkpoints/ and rollback/
# --------------------------------------------------------------------------------------------
def state_files(folder: str | Path) -> list[Path]:
    """The ``step_XXXXXXX.pt`` files of a folder (checkpoints/, rollback/), oldest step first;
    other names are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STATE_NAME.fullmatch(p.name) and p.is_file())


def state_step(path: Path) -> int:
    match = STATE_NAME.fullmatch(path.name)
    assert match is not None, path
    return int(match.group(1))


def checkpoints(run_dir: str | Path) -> list[Path]:
    return state_files(Path(run_dir) / CHECKPOINTS)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    ckpts = checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


__all__ = [
    "LINE_MAX_BYTES",
    "MAX_STEP",
    "Branch",
    "Run",
    "checkpoints",
    "find_runs",
    "is_run_dir",
    "latest_checkpoint",
    "load_run",
    "split_branches",
    "state_files",
    "state_step",
]
