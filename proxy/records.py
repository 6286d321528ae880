"""The run directory: the unit of record every other part reads and writes.

Layout of one run directory::

    config.yaml        the resolved config (also .hydra/config.yaml when Hydra made the run)
    summary.json       always present once the run starts; rewritten atomically
    metrics.jsonl      one JSON object per logged step (flat keys, '/' separators),
                       and one object per event (``{"step": s, "event": kind, ...}``), in the
                       order they happened. After a ``rollback`` event (``restore_step`` r) the
                       loop re-runs steps from r: the rows logged before it with step >= r belong
                       to the abandoned branch, and the reader sets them apart (:class:`Branch`).
    checkpoints/       step_XXXXXXX.pt, loadable with torch.load(weights_only=True)
    rollback/          a rollback remedy's disk snapshots (remedy.rollback_storage=disk)
    spike_kits/        step_XXXXXXX/: what spike capture saved (proxy/train/capture.py)
    tokenizer.json     the BPE tokenizer of a data.source=text run (decodes its checkpoints)
    tensorboard/       TensorBoard event files (tensorboard.enabled=true)
    train.log          Hydra's job log: the run's start, evals and end (proxy-train only)
    error.txt          the traceback of a run that failed
    start_error.txt    why a start (a resume, a second run) in an existing run dir was refused;
                       the run's own files are left as they were
    .lock              held by the one process writing the directory (flock)

``summary.json`` status goes ``running`` -> ``completed`` | ``diverged`` | ``failed`` |
``interrupted`` (SIGINT / SIGTERM: a last checkpoint was written, ``train.resume=true`` goes on).
A run whose process died leaves ``running`` behind; the report lists it as such.

Every file here is untrusted when read back: states load with ``weights_only=True``
(:func:`load_state`) and every path named inside a file is confined to its folder
(:func:`confined`).

This module is the contract: the names above, the metric keys and event kinds below (writers and
readers use these constants, never the strings), the one atomic-write helper, the writer
(:class:`RunRecord`) and the reader (:func:`load_run`). The trainer writes through the ledger
(proxy/train/ledger.py), which writes through :class:`RunRecord`; the report reads through
:func:`load_run`, so a sweep made on a cluster can be copied home and reported without any live
process or wandb.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Optional

# --------------------------------------------------------------------------------------------
# Names in a run directory
# --------------------------------------------------------------------------------------------
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
ROLLBACK_DIR = "rollback"
KITS_DIR = "spike_kits"
TOKENIZER_FILE = "tokenizer.json"
TENSORBOARD_DIR = "tensorboard"
ERROR_FILE = "error.txt"
START_ERROR_FILE = "start_error.txt"
LOCK_FILE = ".lock"
STATE_NAME = re.compile(r"step_(\d{7})\.pt")  # checkpoints/ and rollback/ file names

# summary.json "status": running -> completed | diverged | failed | interrupted; "unknown" is
# what a reader says of a run dir whose summary.json is missing or unreadable.
RUNNING, COMPLETED, STATUS_DIVERGED, FAILED, INTERRUPTED = "running", "completed", "diverged", "failed", "interrupted"
UNKNOWN = "unknown"
STATUSES = (RUNNING, COMPLETED, STATUS_DIVERGED, FAILED, INTERRUPTED)

# --------------------------------------------------------------------------------------------
# Metric keys (metrics.jsonl rows, wandb). A trailing "/" or "_" marks a prefix: the full key
# appends a parameter name, a layer index or a statistic.
# --------------------------------------------------------------------------------------------
STEP = "step"  # every row: the optimizer step it belongs to
EVENT = "event"  # event rows: their kind (below)
TOKENS = "tokens"
TRAIN_LOSS = "train/loss"  # cross-entropy of the step's batch (mean over ranks)
TRAIN_Z_LOSS = "train/z_loss"
TRAIN_TOTAL_LOSS = "train/total_loss"  # what backward() saw: ce + z-loss
VAL_LOSS = "val/loss"
LR = "optim/lr"  # the base (peak-scaled) LR of the step
GRAD_NORM = "optim/grad_norm"  # global norm before clipping
ATTN_MAX_LOGIT = "attn/max_logit"  # max over layers
ATTN_MAX_LOGIT_LAYER = "attn/max_logit/layer_"  # + layer index
OUTPUT = "output/"  # + a statistic of the output logits:
OUTPUT_LOGIT_MEAN = "output/logit_mean"
OUTPUT_LOGIT_MAX = "output/logit_max"
OUTPUT_LSE_MEAN = "output/lse_mean"  # mean log Z over positions
OUTPUT_LSE_MAX = "output/lse_max"  # max log Z over positions
OUTPUT_MEAN_ROW_NORM = "output/mean_row_norm"  # ||mean over the vocabulary of the LM head's rows||
OUTPUT_LOGIT_MEAN_BY_CLASS = "output/logit_mean_"  # + never | rare | frequent (token classes)
GRAD_RMS = "grad_rms/"  # + parameter name; before clipping
UPDATE_RMS = "update_rms/"  # + parameter name; RMS of the applied update / its LR
PARAM_NORM = "param_norm/"  # + parameter name
TOKENS_PER_S = "perf/tokens_per_s"
MFU = "perf/mfu"
ENSEMBLE_TOKENS_PER_S = "perf/ensemble_tokens_per_s"  # an ensemble's members together
DATA_INJECTED_FRAC = "data/injected_frac"
DATA_INJECTED_ROWS = "data/injected_rows"
DATA_MASKED_TOKENS = "data/masked_tokens"
DATA_DROPPED_ROWS = "data/dropped_rows"
GROWTH_ACTIVATION = "growth/activation"  # OLMo 2 growth exponents (diagnostics.growth_exponents),
GROWTH_GRADIENT = "growth/gradient"  # from the first block's output to the last block's
GROWTH_ACTIVATION_FROM_EMBEDDING = "growth/activation_from_embedding"  # ... from the embedding output
GROWTH_GRADIENT_FROM_EMBEDDING = "growth/gradient_from_embedding"
REMEDY = "remedy/"  # wandb only: + event kind, 1 at the step a remedy acted
WANDB_STEP = "trainer/step"  # wandb only: the x-axis of every chart

# what only an ensemble member writes, beside everything a standalone run writes: metric keys,
# and summary fields (its place in the ensemble)
ENSEMBLE_ONLY_KEYS = (ENSEMBLE_TOKENS_PER_S,)
ENSEMBLE_ONLY_FIELDS = ("ensemble",)


def attn_layer_key(layer: int) -> str:
    return f"{ATTN_MAX_LOGIT_LAYER}{layer}"


# --------------------------------------------------------------------------------------------
# Event kinds (event rows of metrics.jsonl)
# --------------------------------------------------------------------------------------------
DIVERGED = "diverged"  # the run stopped: a divergence rule fired (field: reason)
SKIP_STEP = "skip_step"  # a remedy dropped the step's update
ROLLBACK = "rollback"  # a remedy restored a snapshot (fields: restore_step, data_position)
ZCLIP = "zclip"  # a remedy clipped the gradients (fields: z, clipped_to)
SPIKE_KIT = "spike_kit"  # spike capture saved a kit (field: path, relative to the run dir)


# --------------------------------------------------------------------------------------------
# Writing files: atomically, so a crash never leaves a torn file behind
# --------------------------------------------------------------------------------------------
def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf; store them as strings so a diverged value stays visible."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _restore(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v) for v in value]
    return value


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then rename.

    Readers see the old file or the new one, never half of either; if ``write`` fails (a full
    disk, an interrupt) the temporary file is removed and the old file is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save_state(path: str | Path, obj: Any) -> None:
    """``torch.save`` of a state (checkpoint, snapshot, kit), atomically.

    torch is imported here, not at the top: the report reads run directories without it.
    """
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


class StateFileError(ValueError):
    """A state file (checkpoint, snapshot, kit) that cannot be loaded; the message names it.
    ``torn``: the file is truncated or corrupt (as a crash mid-copy leaves it), as opposed to a
    file refused because it asks to run code."""

    def __init__(self, message: str, torn: bool):
        super().__init__(message)
        self.torn = torn


def load_state(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code.
    Any failure is a :class:`StateFileError` of one line naming the file."""
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: never retry unsafely
        what = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln), "a Python object")
        raise StateFileError(f"{path}: refused, not a plain tensor file ({what.rstrip('.')})", torn=False) from None
    except (EOFError, RuntimeError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        size = path.stat().st_size if path.exists() else 0
        raise StateFileError(f"{path}: unreadable ({size} bytes; {type(exc).__name__}: {first[:160]})",
                             torn=True) from None


class UnsafePathError(ValueError):
    """A path read from a file that points outside the folder it must stay in."""


def confined(root: str | Path, name: str) -> Path:
    """``root / name`` for a plain file name read from an untrusted file: no separators, no
    '..', and (symlinks resolved) inside ``root``; else :class:`UnsafePathError`."""
    root = Path(root)
    if not name or name != Path(name).name or name in (".", "..") or "\x00" in name:
        raise UnsafePathError(f"{name!r} is not a plain file name inside {root}")
    path = root / name
    resolved, base = path.resolve(), root.resolve()
    if resolved.parent != base:
        raise UnsafePathError(f"{path} resolves to {resolved}, outside {base}")
    return path


class RunLock:
    """The one writer of a run directory: an exclusive ``flock`` on ``<run_dir>/.lock``, held
    while the run writes and released when it ends or its process dies (no stale locks).

    The lock file is opened without following a symlink (a planted ``.lock`` link must not make
    the pid write land in another file). On a file system without flock (some NFS and Lustre
    mounts) the run goes on unlocked, with a warning."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        import errno
        import fcntl
        import stat
        import warnings

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:  # read-only, a file in the way, a symlinked .lock, no space
            raise RunDirError(f"cannot write to {self.dir}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunDirError(f"{self.dir / LOCK_FILE} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(f"{self.dir} is being written by another process (pid {holder}); "
                             "wait for it, or give this run its own out_dir") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            warnings.warn(f"{self.dir}: this file system has no flock ({exc.strerror}); running without "
                          "the one-writer lock", RuntimeWarning, stacklevel=2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


# what a run directory holds that the program writes into or deletes from: none may be a link
WRITTEN_NAMES = (LOCK_FILE, SUMMARY, METRICS, CONFIG, ERROR_FILE, START_ERROR_FILE, CHECKPOINTS, ROLLBACK_DIR,
                 KITS_DIR, TOKENIZER_FILE, TENSORBOARD_DIR)


def check_no_links(run_dir: str | Path) -> None:
    """UnsafePathError if a file or folder the run writes or deletes in is a symlink (a copied
    or hostile run dir could point the writes and the checkpoint pruning at other files)."""
    run_dir = Path(run_dir)
    links = [name for name in WRITTEN_NAMES if (run_dir / name).is_symlink()]
    if links:
        raise UnsafePathError(f"{run_dir}: {', '.join(links)} {'is a link' if len(links) == 1 else 'are links'}; "
                              "proxy writes only into real files and folders of the run dir")


def holds_run(run_dir: str | Path) -> bool:
    """Whether a directory holds a run a fresh run would overwrite: its record, or checkpoints."""
    return is_run_dir(run_dir) or bool(checkpoints(run_dir))


class RunDirError(RuntimeError):
    """A run directory this process cannot write to."""


class RunDirBusy(RunDirError):
    """Another process holds the run directory's lock."""


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict:
    return _restore(json.loads(Path(path).read_text()))


class RunRecord:
    """Writer side of a run directory."""

    def __init__(self, run_dir: str | Path, resume: bool = False):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.summary: dict[str, Any] = {}
        if resume and (self.dir / SUMMARY).exists():
            self.summary = read_json(self.dir / SUMMARY)
        self._metrics = open(self.dir / METRICS, "a" if resume else "w")
        self.lines = _count_lines(self.dir / METRICS) if resume else 0

    # -- summary ------------------------------------------------------------------------------
    def update(self, **fields: Any) -> None:
        self.summary.update(fields)
        self.summary["updated_at"] = time.time()
        write_json(self.dir / SUMMARY, self.summary)

    # -- metrics ------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {STEP: int(step), **{k: _to_py(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(_clean(row)) + "\n")
        self._metrics.flush()
        self.lines += 1

    def event(self, step: int, kind: str, **fields: Any) -> None:
        """An action taken by the trainer (skip-step, rollback, spike kit, ...)."""
        self.log(step, {EVENT: kind, **fields})

    def truncate_after(self, step: int, lines: Optional[int] = None) -> None:
        """On resume: drop what was logged after the checkpoint, so the record has no duplicates.

        ``lines`` (the checkpoint's :attr:`lines`) cuts by position: exact even when a rollback
        had the run log some steps twice. Without it (older checkpoints) rows are kept by step.
        """
        self._metrics.close()
        path = self.dir / METRICS
        rows = [ln for ln in path.read_text().splitlines() if ln.strip()]
        if lines is not None:
            kept = rows[:lines]
        else:
            kept = [ln for ln in rows if _step_of(ln) <= step]
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))
        self.lines = len(kept)
        self._metrics = open(path, "a")

    def close(self) -> None:
        if not self._metrics.closed:
            self._metrics.close()


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for ln in path.read_text().splitlines() if ln.strip())


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get(STEP, 0)
    except json.JSONDecodeError:  # a torn last line: after any checkpoint
        return math.inf


def _to_py(value: Any) -> Any:
    if hasattr(value, "item"):  # torch / numpy scalars
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------
# Reader side
# ---------------------------------------------------------------------------------------------
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
    branch carry ``rolled_back: True``.
    """

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    abandoned: list[Branch] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.summary.get("status", UNKNOWN)

    @property
    def name(self) -> str:
        return self.summary.get("run_name") or self.path.name

    @property
    def overrides(self) -> list[str]:
        """The run's command-line overrides: from its summary, else (a run whose summary was
        lost) from Hydra's .hydra/overrides.yaml beside it."""
        if self.summary.get("overrides") is not None:
            return [str(o) for o in self.summary["overrides"]]
        hydra = self.path / ".hydra" / "overrides.yaml"
        if hydra.is_file():
            from omegaconf import OmegaConf

            try:
                return [str(o) for o in OmegaConf.load(hydra)]
            except Exception:  # a torn or foreign file: no overrides rather than no report
                return []
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
        if key in row and isinstance(row[key], (int, float)):
            steps.append(row[STEP])
            values.append(float(row[key]))
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
        if row[EVENT] == ROLLBACK and isinstance(restore, (int, float)):
            thrown = [e for e in events if e[STEP] >= restore and not e.get("rolled_back")]
            for earlier in thrown:
                earlier["rolled_back"] = True
            abandoned.append(Branch(row, [r for r in metrics if r[STEP] >= restore], thrown))
            metrics = [r for r in metrics if r[STEP] < restore]
        events.append(row)
    return metrics, events, abandoned


def is_run_dir(path: Path) -> bool:
    """A run directory has a summary.json, or at least a metrics.jsonl (its summary was lost)."""
    return (Path(path) / SUMMARY).is_file() or (Path(path) / METRICS).is_file()


_NOT_RUNS = (CHECKPOINTS, KITS_DIR, ROLLBACK_DIR, TENSORBOARD_DIR, "wandb", ".hydra")  # folders inside a run


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Every run directory at or below the given paths, sorted, without duplicates."""
    found: dict[Path, None] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise FileNotFoundError(f"no such run directory: {p}")
        if is_run_dir(p):
            found.setdefault(p.resolve(), None)
        for marker in sorted([*p.rglob(SUMMARY), *p.rglob(METRICS)]):
            if any(part in _NOT_RUNS for part in marker.relative_to(p).parts):
                continue
            found.setdefault(marker.parent.resolve(), None)
    return sorted(found)


def load_run(path: str | Path) -> Run:
    """A run directory as the report sees it. A missing or unreadable summary.json leaves the
    run listed with status ``unknown`` (its metrics and config still count)."""
    path = Path(path)
    summary: dict[str, Any] = {"status": UNKNOWN}
    if (path / SUMMARY).exists():
        try:
            summary = read_json(path / SUMMARY)
        except ValueError:  # torn by a crash mid-write of an older proxy, or not ours
            summary = {"status": UNKNOWN, "error": f"{path / SUMMARY} is not valid JSON"}
    config: dict[str, Any] = {}
    for candidate in (path / CONFIG, path / ".hydra" / "config.yaml"):
        if candidate.exists():
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(OmegaConf.load(candidate), resolve=False)  # type: ignore[assignment]
            break
    rows = []
    mpath = path / METRICS
    if mpath.exists():
        for line in mpath.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(_restore(json.loads(line)))
            except json.JSONDecodeError:  # a run killed mid-write leaves a torn last line
                continue
    metrics, events, abandoned = split_branches(rows)
    return Run(path=path, summary=summary, config=config, metrics=metrics, events=events,
               abandoned=abandoned)


def state_files(folder: str | Path) -> list[Path]:
    """The ``step_XXXXXXX.pt`` files of a folder (checkpoints/, rollback/), oldest step first;
    other names are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STATE_NAME.fullmatch(p.name) and p.is_file())


def state_step(path: Path) -> int:
    return int(STATE_NAME.fullmatch(path.name).group(1))


def checkpoints(run_dir: str | Path) -> list[Path]:
    return state_files(Path(run_dir) / CHECKPOINTS)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    ckpts = checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


class NullRecord(RunRecord):
    """What ranks other than 0 write to in a data-parallel run: nothing."""

    def __init__(self, run_dir: str | Path, resume: bool = False):  # noqa: D107 - no files
        self.dir = Path(run_dir)
        self.summary = {}
        self.lines = 0

    def update(self, **fields: Any) -> None:
        self.summary.update(fields)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def truncate_after(self, step: int, lines: Optional[int] = None) -> None:
        pass

    def close(self) -> None:
        pass
