"""``proxy-train``: the Hydra entry point (``proxy-train --help``; ``python -m proxy.train``).

It composes conf/config.yaml against the typed schema, names the run after its overrides
(proxy.analysis.run_name_from) and routes it: ``sweep.lrs=[...]`` (or seeds / weight decays)
to a vectorized ensemble in this one process (proxy/train/ensemble.py), anything else to one
run (proxy/train/trainer.py). Exit codes:

    0        a finished run, diverged ones included (a result, not a crash: a multirun goes on)
    2        a config or data error, a refused checkpoint, a run dir that another process writes
             or that already holds a run: one line naming the key or the file (a multirun goes
             on past a taken run dir)
    1        a crash of a single run (the traceback is in ``<run_dir>/error.txt``)
    130/143  SIGINT / SIGTERM: the run stopped at a step boundary with a checkpoint; the line
             printed says how to resume it
"""

from __future__ import annotations

import io
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from proxy.analysis import run_name_from
from proxy.config import CONF_DIR, Config, ConfigError, did_you_mean, register_configs, to_config
from proxy.data import DataError
from proxy.records import (
    ERROR_FILE,
    INTERRUPTED,
    START_ERROR_FILE,
    RunDirError,
    StateFileError,
    StoredFileError,
    Summary,
    UnsafePathError,
    terminal_block,
    terminal_text,
)
from proxy.train.ensemble import sweep_requested
from proxy.train.estimate import announce
from proxy.train.ledger import RunDirTaken
from proxy.train.resume import continue_stored
from proxy.train.trainer import train, train_ensemble

INPUT_ERRORS = (ConfigError, DataError, StateFileError, StoredFileError, UnsafePathError)  # one line, exit 2
TAKEN = (RunDirError, RunDirTaken)  # this job's directory: one line, a multirun goes on


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
        """What went wrong, in one line: Hydra's message, or the last cause of a traceback."""
        return one_line(self.buffer.getvalue())

    def __exit__(self, *exc):
        sys.stderr = self.real
        return False


def one_line(text: str) -> str:
    """Held-back stderr as one line. A traceback gives its last line, the exception that ended it
    (what a read-only or missing directory raises deep inside Hydra); Hydra's own error report
    gives its message without the hint about HYDRA_FULL_ERROR."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        causes = [
            ln
            for ln in lines
            if not ln.startswith(("File ", "Traceback", "^", "~"))
            and ":" in ln
            and ln.split(":", 1)[0].replace(".", "").replace("_", "").isalnum()
        ]
        denied = next((m for m in map(_DENIED.search, causes) if m), None)
        if denied:  # under "Unable to configure handler 'file'": the folder Hydra logs into
            return (
                f"cannot write {denied.group('path')}: {denied.group('why')} (proxy-train writes its log "
                "and .hydra/ into hydra.run.dir: give it a writable folder)"
            )
        return causes[-1] if causes else lines[-1]
    lines = [ln for ln in lines if "HYDRA_FULL_ERROR" not in ln and not ln.startswith("object_type")]
    text = " ".join(lines)
    unknown = re.search(r"Could not override '([\w.]+)'\..*not in '", text)
    if unknown:  # Hydra's advice (append it with +) would train with the typo ignored
        key = unknown.group(1)
        return f"unknown key {key}{did_you_mean(key)}: proxy's schema has no such key"
    return text


# an OSError of a folder that cannot be written, as a traceback prints it
_DENIED = re.compile(r"\[Errno (?:13|30|1)\] (?P<why>[^:]+): '(?P<path>[^']+)'")

_gate: Optional[_StderrGate] = None


HYDRA_WRITES = ("train.log", ".hydra", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml")
HYDRA_DIR_KEY = re.compile(r"\+{0,2}hydra\.(run|sweep)\.dir=(.*)")


def _linked_hydra_files(argv: list[str]) -> Optional[str]:
    """Hydra writes its job log and .hydra/ into the run dir, and multirun.yaml and each job's
    folder into the sweep dir, by opening them in place: where a copied folder is named as
    ``hydra.run.dir`` or ``hydra.sweep.dir`` (``+``/``++`` forms too), none of them may be a link
    (they would be written through). The line that refuses such a start, or None."""
    named: dict[str, str] = {}
    for arg in argv:
        match = HYDRA_DIR_KEY.fullmatch(arg)
        if match:
            named[match.group(1)] = match.group(2).strip("'\"")
    links: list[Path] = []
    if "run" in named:
        folder = Path(named["run"]).expanduser()
        links += [folder / name for name in HYDRA_WRITES if (folder / name).is_symlink()]
    if "sweep" in named:
        folder = Path(named["sweep"]).expanduser()
        if (folder / "multirun.yaml").is_symlink():
            links.append(folder / "multirun.yaml")
        jobs = sorted(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []
        for job in jobs:
            if job.is_symlink():
                links.append(job)
            elif job.is_dir():
                links += [job / name for name in HYDRA_WRITES if (job / name).is_symlink()]
    links = list(dict.fromkeys(links))
    if links:
        shown = ", ".join(str(p) for p in links[:3]) + (f" and {len(links) - 3} more" if len(links) > 3 else "")
        return (
            f"{shown} {'is a link' if len(links) == 1 else 'are links'}; Hydra would write its log and "
            "config through it: remove the link, or give Hydra another folder"
        )
    return None


class _TerminalSafe(logging.Filter):
    """Log lines can carry a run name or a path read from a copied run dir: their control
    characters (terminal escape sequences) are shown as text, never obeyed."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = terminal_block(message)
        if safe != message:
            record.msg, record.args = safe, ()
        return True


def _refuse_linked_log() -> None:
    """Exit 2 before the first log line if Hydra's job log opened a link (a planted train.log)."""
    for handler in logging.getLogger().handlers:
        name = getattr(handler, "baseFilename", None)
        if name and os.path.islink(name):
            print(
                f"error: {terminal_text(name)} is a link; Hydra would append the run's log to what it points "
                "at: remove it, or give hydra.run.dir another folder",
                file=sys.stderr,
            )
            sys.exit(2)


HYDRA_ONLY = (".hydra", "train.log")  # what Hydra writes in a run folder before the job starts
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # in .hydra/


def _drop_hydra_leftovers(run_dir: Path) -> None:
    """Remove the folder Hydra made for a run whose config was refused, where it holds nothing
    but Hydra's own files and an empty log (so nothing of anyone's is lost: a folder with any
    other file, a link or a written log is left as it is)."""
    try:
        entries = {p.name: p for p in run_dir.iterdir()}
        if not entries or set(entries) - set(HYDRA_ONLY) or any(p.is_symlink() for p in entries.values()):
            return
        hydra, log_file = entries.get(".hydra"), entries.get("train.log")
        if hydra is not None and any(p.is_symlink() or p.name not in HYDRA_FILES for p in hydra.iterdir()):
            return  # (a .hydra that is not a folder raises NotADirectoryError: left as it is)
        if log_file is not None and (not log_file.is_file() or log_file.stat().st_size > 0):
            return
        if hydra is not None:
            for p in hydra.iterdir():
                p.unlink()
            hydra.rmdir()
        if log_file is not None:
            for handler in list(logging.getLogger().handlers):  # Hydra's file handler on train.log
                if getattr(handler, "baseFilename", None) == str(log_file.resolve()):
                    handler.close()
                    logging.getLogger().removeHandler(handler)
            log_file.unlink()
        run_dir.rmdir()
    except OSError:  # someone else's folder, or one that changed under us: left as it is
        return


def _hydra_task(dcfg) -> Optional[float]:
    if _gate is not None:
        _gate.release()
    _refuse_linked_log()
    for handler in logging.getLogger().handlers:  # the console and train.log, as Hydra set them up
        handler.addFilter(_TerminalSafe())
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    overrides = tuple(hc.overrides.task)
    stored_name: Optional[str] = None
    try:
        cfg = to_config(dcfg)
        run_dir = Path(cfg.out_dir or hc.runtime.output_dir)
        if cfg.train.resume and not sweep_requested(cfg):
            cfg, overrides, stored_name = _continue_stored(cfg, run_dir, overrides)
    except ConfigError as exc:
        print(f"error: {terminal_text(exc)}", file=sys.stderr)
        if not multirun:  # the config is checked before anything of the run is written: nor is Hydra's
            _drop_hydra_leftovers(Path(hc.runtime.output_dir))
        sys.exit(2)
    sweep_id = Path(hc.sweep.dir).name if multirun else None
    name = cfg.run_name or stored_name or run_name_from(overrides)
    line = announce(cfg)
    if line and int(os.environ.get("RANK", "0")) == 0:
        print(terminal_text(f"{name}: {line}"), flush=True)
    try:
        if sweep_requested(cfg):  # sweep.lrs=[...]: K members vectorized in this one process
            members = train_ensemble(cfg, run_dir, name, sweep_id, overrides)
            for member in members:
                print(terminal_text(f"{member.status}: {member.run_name}"))
            interrupted = [m for m in members if m.status == INTERRUPTED]
            if interrupted:
                _stop_interrupted(interrupted[0], run_dir, members=interrupted)
            return None
        summary = train(cfg, run_dir, name, sweep_id, overrides)
    except TAKEN as exc:
        print(f"error: {terminal_text(exc)}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        return None
    except INPUT_ERRORS as exc:
        print(f"error: {terminal_text(exc)}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # recorded as failed in summary.json, traceback in error.txt
        print(
            terminal_text(f"error: run failed: {type(exc).__name__}: {exc}{_traceback_hint(run_dir)}"), file=sys.stderr
        )
        if not multirun:
            sys.exit(1)
        return None  # a multirun goes on to its next job
    if summary.status == INTERRUPTED:
        _stop_interrupted(summary, run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        print(terminal_text(f"{summary.status}: {name} -> {run_dir}"))
    return summary.final_val_loss


def _continue_stored(
    cfg: Config, run_dir: Path, overrides: tuple[str, ...]
) -> tuple[Config, tuple[str, ...], Optional[str]]:
    """train.resume=true: the config, overrides and name of the run stored in ``run_dir``, with
    only what this command's overrides set (proxy/train/resume.py); the run's ledger then checks
    that nothing changed that a resume may not change."""
    from hydra import compose  # inside a Hydra job: the same config tree, no override

    continued = continue_stored(cfg, to_config(compose(config_name="config")), run_dir, overrides)
    if continued is None:  # nothing stored that loads: the ledger says why
        return cfg, overrides, None
    return continued.cfg, continued.overrides, continued.run_name


def _traceback_hint(run_dir: Path) -> str:
    """Where the traceback was written, if it was (a start that failed writes start_error.txt;
    a full disk may have written neither)."""
    for name in (ERROR_FILE, START_ERROR_FILE):
        if (run_dir / name).is_file():
            return f" (traceback in {run_dir / name})"
    return ""


def _stop_interrupted(summary: Summary, run_dir: Path, members: Optional[list[Summary]] = None) -> None:
    """One line on how to go on, then the signal's exit code (a multirun stops too). An
    ensemble's members resume one by one, each as the standalone run it is."""
    signame = summary.interrupted_by or "SIGINT"
    code = 128 + int(getattr(signal, signame, signal.SIGINT))
    if int(os.environ.get("RANK", "0")) == 0:  # a resume continues the stored config: no override to retype
        if members is None:
            how = resume_command(run_dir)
        else:
            how = (
                f"each member on its own, e.g. {resume_command(run_dir / (members[0].ensemble or {})['label'])} "
                f"({len(members)} members interrupted)"
            )
        print(f"interrupted by {signame} at step {summary.steps_completed}; continue with: {how}", file=sys.stderr)
    sys.exit(code)


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``, ready for a shell. A path outside
    Hydra's plain characters is quoted for Hydra, then for the shell: a member's directory
    (``lr=0.001``) holds an "=" that Hydra's override grammar refuses unquoted."""
    value = str(run_dir)
    arg = f"out_dir={value}" if re.fullmatch(r"[\w/.~+-]+", value) else shlex.quote(f'out_dir="{value}"')
    return f"proxy-train train.resume=true {arg}"


def _quiet_non_zero_ranks() -> None:
    """Under torchrun, ranks > 0 get a throw-away Hydra dir: rank 0's run dir is the record."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if rank == 0:
        return
    extra = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    if not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]):
        extra.append(f"hydra.run.dir={tempfile.mkdtemp(prefix=f'proxy-rank{rank}-')}")
    sys.argv += extra


def main() -> None:
    """``proxy-train``: Hydra over conf/config.yaml; see ``proxy-train --help``."""
    global _gate
    register_configs()
    linked = _linked_hydra_files(sys.argv[1:])
    if linked:
        sys.stderr.write(f"error: {terminal_text(linked)}\n")
        raise SystemExit(2)
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
        except Exception as exc:  # raised by Hydra before any job started (a mode clash, ...)
            if _gate.open:
                raise
            _gate.real.write(f"error: {_before_job(exc)}\n")
            raise SystemExit(2) from None
    _gate.release()


def _before_job(exc: Exception) -> str:
    """One line for an error Hydra raised before a job started. ``-m`` with ``--cfg``: Hydra
    prints the config of one job, never of a sweep."""
    text = one_line(f"{type(exc).__name__}: {exc}")
    argv = sys.argv[1:]
    if any(a in ("-m", "--multirun") for a in argv) and any(a.startswith(("-c", "--cfg")) for a in argv):
        text += " (--cfg shows one job's config: drop -m and give each swept key one value)"
    return text
