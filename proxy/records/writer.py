"""The writer side of a run directory: its one-writer lock and its record (summary and metrics).

The trainer writes through the run ledger (proxy/train/ledger.py), which writes through
:class:`RunRecord`; every file goes through the one atomic writer (proxy/records/files.py) but
metrics.jsonl, which grows by appending whole lines to a file opened without following a link.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

from proxy.records.files import UnsafePathError, _clean, atomic_write_bytes, open_untrusted, read_json, write_json
from proxy.records.keys import (
    CHECKPOINTS,
    CONFIG,
    ERROR_FILE,
    EVENT,
    KITS_DIR,
    LOCK_FILE,
    METRICS,
    ROLLBACK_DIR,
    START_ERROR_FILE,
    STEP,
    SUMMARY,
    TENSORBOARD_DIR,
    TOKENIZER_FILE,
    WANDB_DIR,
)
from proxy.records.reader import checkpoints, is_run_dir

# Room kept for the record of a failure: the lock file holds this many bytes while the run
# writes, and gives them back before the failure is written, so a full disk still ends the run
# as failed with its error (the summary and error.txt take a few kB).
RESERVE_BYTES = 128 << 10
FILE_MODE = 0o666  # less the umask: the mode of every file proxy writes (proxy/records/files.py)


class RunDirError(RuntimeError):
    """A run directory this process cannot write to."""


class RunDirBusy(RunDirError):
    """Another process holds the run directory's lock."""


class RunLock:
    """The one writer of a run directory: an exclusive ``flock`` on ``<run_dir>/.lock``, held
    while the run writes and released when it ends or its process dies (no stale locks).

    The lock file is opened without following a symlink (a planted ``.lock`` link must not make
    the pid write land in another file). While held it also keeps :data:`RESERVE_BYTES` of disk
    for the record of a failure (:meth:`free_reserve`). On a file system without flock (some NFS
    and Lustre mounts) the run goes on unlocked, with a warning."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self._fd: Optional[int] = None
        self._pid_line = b""

    def acquire(self) -> None:
        import fcntl
        import stat
        import warnings

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:  # read-only, a file in the way, a symlinked .lock, no space
            raise RunDirError(f"cannot write to {self.dir}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunDirError(f"{self.dir / LOCK_FILE} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).split(b"\n")[0].decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(
                f"{self.dir} is being written by another process (pid {holder}); "
                "wait for it, or give this run its own out_dir"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            warnings.warn(
                f"{self.dir}: this file system has no flock ({exc.strerror}); running without the one-writer lock",
                RuntimeWarning,
                stacklevel=2,
            )
        self._pid_line = f"{os.getpid()}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._pid_line, 0)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except (OSError, AttributeError):  # no room even for that, or no fallocate: no reserve
            pass
        self._fd = fd

    def free_reserve(self) -> None:
        """Give the reserved bytes back to the file system (before a failure is written)."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, len(self._pid_line))
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is not None:
            self.free_reserve()
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


# what a run directory holds that the program writes into or deletes from: none may be a link
WRITTEN_NAMES = (
    LOCK_FILE,
    SUMMARY,
    METRICS,
    CONFIG,
    ERROR_FILE,
    START_ERROR_FILE,
    CHECKPOINTS,
    ROLLBACK_DIR,
    KITS_DIR,
    TOKENIZER_FILE,
    TENSORBOARD_DIR,
    WANDB_DIR,
)


def check_no_links(run_dir: str | Path) -> None:
    """UnsafePathError if a file or folder the run writes or deletes in is a symlink (a copied
    or hostile run dir could point the writes and the checkpoint pruning at other files)."""
    run_dir = Path(run_dir)
    links = [name for name in WRITTEN_NAMES if (run_dir / name).is_symlink()]
    if links:
        raise UnsafePathError(
            f"{run_dir}: {', '.join(links)} {'is a link' if len(links) == 1 else 'are links'}; "
            "proxy writes only into real files and folders of the run dir"
        )


def holds_run(run_dir: str | Path) -> bool:
    """Whether a directory holds a run a fresh run would overwrite: its record, or checkpoints."""
    return is_run_dir(run_dir) or bool(checkpoints(run_dir))


def _open_append(path: Path, truncate: bool) -> int:
    """A descriptor appending to ``path``, made with the one file mode; never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
    try:
        return os.open(path, flags, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{path} is a link; proxy writes only into real files of the run dir") from None
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class RunRecord:
    """Writer side of a run directory: summary.json (rewritten atomically on every update) and
    metrics.jsonl (one whole line per write, unbuffered: nothing waits in memory to be lost)."""

    def __init__(self, run_dir: str | Path, resume: bool = False):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.summary: dict[str, Any] = {}
        if resume and (self.dir / SUMMARY).exists():
            self.summary = read_json(self.dir / SUMMARY)
        self._fd: Optional[int] = _open_append(self.dir / METRICS, truncate=not resume)
        self.lines = _count_lines(self.dir / METRICS) if resume else 0

    # -- summary ------------------------------------------------------------------------------
    def update(self, **fields: Any) -> None:
        self.summary.update(fields)
        self.summary["updated_at"] = time.time()
        write_json(self.dir / SUMMARY, self.summary)

    # -- metrics ------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {STEP: int(step), **{k: _to_py(v) for k, v in metrics.items()}}
        line = (json.dumps(_clean(row)) + "\n").encode()
        if self._fd is None:
            raise ValueError(f"{self.dir / METRICS} is closed")
        try:
            _write_all(self._fd, line)
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(self.dir / METRICS)) from None
        self.lines += 1

    def event(self, step: int, kind: str, **fields: Any) -> None:
        """An action taken by the trainer (skip-step, rollback, spike kit, ...)."""
        self.log(step, {EVENT: kind, **fields})

    def truncate_after(self, step: int, lines: Optional[int] = None) -> None:
        """On resume: drop what was logged after the checkpoint, so the record has no duplicates.

        ``lines`` (the checkpoint's :attr:`lines`) cuts by position: exact even when a rollback
        had the run log some steps twice. Without it (older checkpoints) rows are kept by step.
        """
        self.close()
        path = self.dir / METRICS
        rows = _lines(path)
        if lines is not None:
            kept = rows[:lines]
        else:
            kept = [ln for ln in rows if _step_of(ln) <= step]
        atomic_write_bytes(path, b"".join(ln + b"\n" for ln in kept))
        self.lines = len(kept)
        self._fd = _open_append(path, truncate=False)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _lines(path: Path) -> list[bytes]:
    """The non-empty lines of metrics.jsonl, as bytes (whatever a copied file holds)."""
    with open_untrusted(path) as f:
        return [ln.rstrip(b"\r") for ln in f.read().split(b"\n") if ln.strip()]


def _count_lines(path: Path) -> int:
    return len(_lines(path)) if path.exists() else 0


def _step_of(line: bytes) -> float:
    try:
        step = json.loads(line).get(STEP, 0)
    except (ValueError, AttributeError, RecursionError):  # a torn last line: after any checkpoint
        return math.inf
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else math.inf


def _to_py(value: Any) -> Any:
    if hasattr(value, "item"):  # torch / numpy scalars
        return value.item()
    return value


class NullRecord(RunRecord):
    """What ranks other than 0 write to in a data-parallel run: nothing."""

    def __init__(self, run_dir: str | Path, resume: bool = False):  # noqa: D107 - no files
        self.dir = Path(run_dir)
        self.summary = {}
        self.lines = 0
        self._fd = None

    def update(self, **fields: Any) -> None:
        self.summary.update(fields)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def truncate_after(self, step: int, lines: Optional[int] = None) -> None:
        pass

    def close(self) -> None:
        pass


__all__ = [
    "RESERVE_BYTES",
    "WRITTEN_NAMES",
    "NullRecord",
    "RunDirBusy",
    "RunDirError",
    "RunLock",
    "RunRecord",
    "check_no_links",
    "holds_run",
]
