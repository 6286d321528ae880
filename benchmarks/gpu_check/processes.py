"""The device check's processes: every descendant of a part dies with it (its own process group,
killed when the part ends, runs past its cap, or the parent exits)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.gpu_check.recorder import ROOT

# ============================================================================================
# Processes: every descendant of a part dies with it
# ============================================================================================
_LIVE_GROUPS: set[int] = set()  # in the parent: the process group of the part running now


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left in it
        pass


def kill_live_groups() -> None:
    for pgid in list(_LIVE_GROUPS):
        _kill_group(pgid)
        _LIVE_GROUPS.discard(pgid)


def _descendants(pid: int) -> list[int]:
    """pid's children, their children, ..., from /proc/<pid>/stat (Linux; elsewhere none found).
    /proc/<pid>/task/*/children would be simpler but not every kernel has it (gVisor lacks it)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # the name, field 2, is in parentheses and may hold spaces: state and ppid follow it
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # it exited meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [*_descendants(proc.pid), proc.pid]:  # listed before any dies: none is reparented yet
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _new_group() -> dict[str, Any]:
    """Popen arguments for a new process group in this session (not a new session: the device
    tool, like a terminal, ends what a command leaves behind unless it left the session)."""
    return {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def run_capped(cmd: list[str], env: dict[str, str], timeout: float, own_group: bool = False) -> tuple[str, str, int]:
    """Run a command; past ``timeout`` kill it and everything it started, then raise TimeoutExpired.

    own_group=True is the parent starting a part: the part leads a new process group, everything
    it starts stays in that group, and the group is killed whenever the part ends (its leftovers
    too) or the parent leaves (main's signal handlers and finally). own_group=False is a part
    starting pytest, proxy-train or proxy-verdict: the command stays in the part's group, so the
    part's cap reaches it, and its own timeout kills it and its descendants."""
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **(_new_group() if own_group else {}),
    )
    if own_group:
        _LIVE_GROUPS.add(proc.pid)
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            if own_group:
                _kill_group(proc.pid)
            else:
                _kill_tree(proc)
            out, err = _drain(proc)
            raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    finally:
        if own_group:
            _kill_group(proc.pid)
            _LIVE_GROUPS.discard(proc.pid)
    return out, err, proc.returncode


def _drain(proc: subprocess.Popen) -> tuple[str, str]:
    """The output of a killed command; empty if something that escaped the kill holds its pipes."""
    try:
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.wait()
        return "", ""
