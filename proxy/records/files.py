"""Files in and out of a run directory: the one writer, and the readers of untrusted files.

Writing. Every file proxy writes (run records, checkpoints, kits, reports, figures, verdicts,
prepared data) goes through :func:`atomic_write`: a temporary file is created beside the target
(``O_EXCL | O_NOFOLLOW``, mode 0o666 less the umask, so every file of a run has one mode),
written, flushed, synced and renamed over the target. A rename replaces a symbolic link that
stands where the target goes; it never writes through it. A reader sees the old file or the new
one, never half of either, and a failed write (a full disk, a signal) removes its temporary file
and leaves the old file whole. A folder that output goes into is made by :func:`output_dir`,
which refuses a link or a non-folder at every step below the folder the user named, so no output
lands outside it.

Reading. A run directory, a spike kit, a corpus or a tokenizer may have been copied from anyone:
what proxy reads from one is data, never code and never a pointer elsewhere. States load with
``weights_only=True`` (:func:`load_state`); JSON and YAML are read without following a link,
bounded in size (:func:`read_untrusted`), YAML with no interpolation resolved and no alias that
expands past :data:`YAML_MAX_VALUES` (:func:`read_yaml`); a file name read from a file stays
inside its folder (:func:`confined`). Each refusal is one line naming the file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import stat
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Optional

JSON_MAX_BYTES = 64 << 20  # summary.json, kit.json, verdict.json: a few kB in practice
JSON_MAX_VALUES = 1_000_000
YAML_MAX_BYTES = 1 << 20  # config.yaml: a few kB in practice
YAML_MAX_VALUES = 100_000  # values a YAML file may expand to, aliases counted each time they are used
MAX_DEPTH = 64  # nesting a stored config or summary may have
MAX_INT = 1 << 63  # no integer proxy writes is larger (a float cannot hold 10**400)
INTERPOLATION = "${"

# temporary files of atomic_write: ".<target>.<random>.tmp" (older versions: mkstemp's 8 characters)
TEMPORARY_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{6,32}\.tmp")


class UnsafePathError(ValueError):
    """A path that would make proxy read or write outside the folder it was given: a link, or
    a name read from a file that leaves its folder."""


class StoredFileError(ValueError):
    """A file read back (a summary, a config, a metrics log) that is not what proxy writes; the
    message is one line naming the file and what is wrong."""


class StateFileError(ValueError):
    """A state file (checkpoint, snapshot, kit) that cannot be loaded; the message names it.
    ``torn``: the file is truncated or corrupt (as a crash mid-copy leaves it), as opposed to a
    file refused because it asks to run code."""

    def __init__(self, message: str, torn: bool):
        super().__init__(message)
        self.torn = torn


# --------------------------------------------------------------------------------------------
# Writing: one writer, atomic, never through a link
# --------------------------------------------------------------------------------------------
def _plain_part(name: str, where: Path) -> None:
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise UnsafePathError(f"{name!r} is not a plain folder name inside {where}")


def _real_folder(path: Path, what: str) -> None:
    """UnsafePathError if ``path`` is a link or exists as something other than a folder."""
    if path.is_symlink():
        raise UnsafePathError(
            f"{path} is a link (to {os.readlink(path)}); proxy writes {what} only into "
            "real folders: remove the link, or name a real folder"
        )
    if path.exists() and not path.is_dir():
        raise UnsafePathError(f"{path} is not a folder; proxy cannot write {what} into it")


def output_dir(named: str | Path, *parts: str, what: str = "its output") -> Path:
    """The folder ``named/parts...``, made where missing. ``named`` is the folder the user named
    (the folders above it are theirs, links or not); ``named`` itself and every one of ``parts``
    must be a real folder, not a link: UnsafePathError (one line) otherwise, before anything is
    written, so no output resolves outside ``named``."""
    path = Path(named).expanduser()
    _real_folder(path, what)
    path.mkdir(parents=True, exist_ok=True)
    for part in parts:
        _plain_part(part, path)
        path = path / part
        _real_folder(path, what)
        try:
            path.mkdir()
        except FileExistsError:
            _real_folder(path, what)  # made by someone else meanwhile: still a real folder?
    return path


class _RecordingFile:
    """A file object that remembers the first OSError its writes raised: torch.save reports a
    failed write as "unexpected pos ...", and the real cause (a full disk) must reach the user."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then rename it
    over ``path`` (a link standing at ``path`` is replaced, never written through).

    The folder must not be a link (UnsafePathError). If ``write`` fails (a full disk, an
    interrupt) the temporary file is removed, the old file is left as it was, and a failed write
    is raised as the OSError naming ``path`` (``[Errno 28] No space left on device: '...'``).
    """
    path = Path(path)
    folder = path.parent
    _real_folder(folder, "files")
    folder.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        tmp = folder / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask applies: the mode of every file proxy writes
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    sink = _RecordingFile(os.fdopen(fd, "wb"))
    try:
        try:
            write(sink)
            sink.flush()
            os.fsync(sink.fileno())
        finally:
            sink._f.close()
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        cause = sink.error if sink.error is not None else exc
        if isinstance(cause, OSError) and cause.errno is not None:
            raise OSError(cause.errno, os.strerror(cause.errno), str(path)) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def save_figure(fig: Any, path: str | Path, **savefig: Any) -> None:
    """A matplotlib figure as a PNG file, through the one writer (``savefig`` options pass on)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **savefig)
    atomic_write_bytes(path, buffer.getvalue())


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


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")


def save_state(path: str | Path, obj: Any) -> None:
    """``torch.save`` of a state (checkpoint, snapshot, kit), atomically.

    torch is imported here, not at the top: the report reads run directories without it.
    """
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def remove_temporaries(folders: Iterable[Path]) -> list[Path]:
    """Delete what an interrupted :func:`atomic_write` left in ``folders`` (its temporary files,
    never a link's target); returns what was removed. Only the one writer of a run dir calls
    this, holding its lock."""
    removed = []
    for folder in folders:
        if folder.is_symlink() or not folder.is_dir():
            continue
        for path in folder.iterdir():
            if TEMPORARY_NAME.fullmatch(path.name) and (path.is_symlink() or path.is_file()):
                path.unlink()
                removed.append(path)
    return removed


# --------------------------------------------------------------------------------------------
# Reading untrusted files
# --------------------------------------------------------------------------------------------
def open_untrusted(path: str | Path) -> IO[bytes]:
    """A regular file opened for reading without following a link and without blocking (a FIFO
    planted as summary.json must not hang the report); StoredFileError or UnsafePathError (one
    line naming the file) for a link, a folder or a device. FileNotFoundError where there is none."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{path} is a link; proxy reads only the files of the folder itself") from None
        if exc.errno == errno.ENOENT:
            raise
        raise StoredFileError(f"{path}: cannot be read ({exc.strerror})") from None
    f = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise StoredFileError(f"{path} is {kind}")
    return f


def read_untrusted(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file (:func:`open_untrusted`), at most ``limit`` of them:
    StoredFileError for a larger one."""
    with open_untrusted(path) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise StoredFileError(f"{path} is larger than {limit:,} bytes: not a file proxy wrote")
    return data


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def read_json(path: str | Path, limit: int = JSON_MAX_BYTES) -> dict:
    """A JSON object from an untrusted file ('nan'/'inf' strings back to floats);
    StoredFileError (one line naming the file) if it is not one."""
    path = Path(path)
    data = read_untrusted(path, limit)
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise StoredFileError(f"{path} is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(value, dict):
        raise StoredFileError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return plain_json(value, str(path))


def plain_json(value: Any, where: str) -> Any:
    """A parsed JSON value checked as :func:`check_plain` checks stored data (depth, size, no
    integer a float cannot hold; interpolations are text here), 'nan'/'inf' strings back to floats."""
    check_plain(value, where, interpolations=True, limit=JSON_MAX_VALUES)
    return _restore(value)


def _yaml_loader() -> type:
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # type: ignore[misc, valid-type]
        """Safe YAML, reading 1e-3 as the float it is (YAML 1.1 wants a dot in a float)."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
        list("-+0123456789."),
    )
    return Loader


def check_plain(
    value: Any,
    where: str,
    *,
    interpolations: bool = False,
    limit: int = YAML_MAX_VALUES,
    budget: Optional[list[int]] = None,
    depth: int = 0,
    key: str = "",
) -> None:
    """StoredFileError unless ``value`` is plain data: at most ``limit`` values (an alias counted
    each time it is used), :data:`MAX_DEPTH` levels, string keys, integers a float can hold, and
    no ``${...}`` interpolation anywhere unless ``interpolations`` (stored configs are data: proxy
    never resolves one; a summary's overrides may quote what the user typed)."""
    budget = budget if budget is not None else [limit]
    budget[0] -= 1
    if budget[0] < 0:
        raise StoredFileError(f"{where} expands to more than {limit:,} values (a YAML alias bomb?)")
    if depth > MAX_DEPTH:
        raise StoredFileError(f"{where} nests deeper than {MAX_DEPTH} levels at {key or 'the top'}")
    name = key or "the top level"
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) >= MAX_INT:
            raise StoredFileError(f"{where}: {name} holds an integer of {len(str(abs(value)))} digits")
    elif isinstance(value, str):
        if INTERPOLATION in value and not interpolations:
            raise StoredFileError(
                f"{where}: {name} holds an interpolation ({value[:80]!r}); stored files are "
                "data and proxy never resolves them"
            )
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise StoredFileError(f"{where}: a key under {name} is a {type(k).__name__}, not a string")
            if INTERPOLATION in k and not interpolations:
                raise StoredFileError(f"{where}: the key {k[:80]!r} holds an interpolation")
            check_plain(
                v,
                where,
                interpolations=interpolations,
                limit=limit,
                budget=budget,
                depth=depth + 1,
                key=f"{key}.{k}" if key else k,
            )
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_plain(
                v, where, interpolations=interpolations, limit=limit, budget=budget, depth=depth + 1, key=f"{key}[{i}]"
            )
    elif value is not None and not isinstance(value, (bool, float)):
        raise StoredFileError(f"{where}: {name} is a {type(value).__name__}, not plain data")


def read_yaml(path: str | Path, limit: int = YAML_MAX_BYTES) -> Any:
    """A stored YAML file (config.yaml, .hydra/overrides.yaml) as plain data: safe YAML, at most
    ``limit`` bytes, checked by :func:`check_plain` (no interpolation, no alias bomb).
    StoredFileError (one line naming the file and the key) otherwise."""
    import yaml

    path = Path(path)
    data = read_untrusted(path, limit)
    try:
        value = yaml.load(data, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or _first_line(exc)
        raise StoredFileError(f"{path} is not valid YAML{where}: {problem}") from None
    check_plain(value, str(path))
    return value


def load_state(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code,
    and never through a link. Any failure is a :class:`StateFileError` of one line naming the file."""
    import pickle

    import torch

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateFileError(
                f"{path}: refused, a link (proxy reads only the files of the folder itself)", torn=False
            ) from None
        raise StateFileError(f"{path}: unreadable ({exc.strerror})", torn=True) from None
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise StateFileError(f"{path}: refused, not a regular file", torn=False)
            return torch.load(f, map_location=map_location, weights_only=True)
    except StateFileError:
        raise
    except pickle.UnpicklingError as exc:  # weights_only refused a global: never retry unsafely
        what = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln), "a Python object")
        raise StateFileError(f"{path}: refused, not a plain tensor file ({what.rstrip('.')})", torn=False) from None
    except (EOFError, RuntimeError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        size = path.stat().st_size if path.exists() else 0
        raise StateFileError(
            f"{path}: unreadable ({size} bytes; {type(exc).__name__}: {first[:160]})", torn=True
        ) from None


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


# --------------------------------------------------------------------------------------------
# Showing untrusted text on a terminal (run names, errors, kit strings)
# --------------------------------------------------------------------------------------------
_TERMINAL_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def terminal_text(text: Any) -> str:
    """Text safe to print: control characters (terminal escape sequences among them) and
    bidirectional overrides shown as ``\\x1b``-style escapes instead of acting on the terminal."""
    return _TERMINAL_UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def terminal_block(text: Any) -> str:
    """Several lines for the terminal, each made safe by :func:`terminal_text`."""
    return "\n".join(terminal_text(line) for line in str(text).split("\n"))


__all__ = [
    "INTERPOLATION",
    "StateFileError",
    "StoredFileError",
    "UnsafePathError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_plain",
    "confined",
    "load_state",
    "open_untrusted",
    "output_dir",
    "read_json",
    "read_untrusted",
    "plain_json",
    "read_yaml",
    "remove_temporaries",
    "save_figure",
    "save_state",
    "terminal_block",
    "terminal_text",
    "write_json",
]
