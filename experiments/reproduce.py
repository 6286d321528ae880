"""Do the committed study results still come out of today's code? (issue 33, item 2)

Every study commits its runs as ``results/**/runs.csv`` (one row per run: the job folder it ran in,
its final losses, its planned steps and parameter count, and, since 2026-12-06, the commit it
trained with). This script re-runs the cheapest job of each such table with today's code and
presets, one thread per job as the studies ran, and compares each run of the job with its row:

- ``same``: the final train and val loss equal to 6 significant digits (CPU training is
  deterministic for one torch build and thread count, so a match is usually to the bit);
- ``close``: within 0.1 % (relative), e.g. another torch build's reductions;
- ``differs``: further apart: the committed result no longer comes out of today's code;
- ``preset changed``: the job now plans another number of steps or parameters (the preset was
  rewritten after the result, as for a protocol 1 whose preset became protocol 2's): not comparable;
- ``not run``: a job folder whose name was cut to a hash, or past the ``--budget``.

A result marked ``differs`` is either re-run or read as "from an older version" (its study README
says which); the table this writes (``--out``, default experiments/reproduction.md) is committed
with the date, the commit and the machine. Cheapest first, so a budget keeps the quick ones.

``python experiments/reproduce.py [--only SUBSTR ...] [--budget SECONDS] [--jobs N] [--dry-run]``
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONF = REPO / "conf" / "experiment"
SAME, CLOSE = 1e-6, 1e-3  # relative tolerances: 6 significant digits; 0.1 %
JOB_PREFIX = re.compile(r"^\d+_")


@dataclass
class Job:
    """The job of a results table chosen to re-run, and the committed rows of its runs."""

    table: Path  # the runs.csv
    folder: str  # the job folder it ran in ("3_+experiment=...,optim.mup=true")
    overrides: list[str]
    rows: list[dict[str, str]]
    cost_s: float  # its committed wall time (the slowest of its runs)
    why_not: str = ""  # set when the job cannot be re-run as committed


@dataclass
class Outcome:
    job: Job
    status: str  # same | close | differs | preset changed | not run | failed
    detail: str = ""
    runs: list[tuple[str, str]] = field(default_factory=list)  # (run key, its comparison)
    wall_s: float = 0.0


def current_preset(value: str) -> Optional[str]:
    """Today's name of a preset as a result recorded it: ``loss_spikes/lab`` as is, its folder
    spelling ``loss_spikes-lab``, the flat names of before 2026-12-05 (``loss_spikes_lab``,
    ``spike_remedies_clipping_lab``) where one underscore is today's folder separator, and a lab
    preset renamed to its ``_lab`` spelling (``spike_frequency/own_lr``)."""
    for candidate in (value, value.replace("-", "/")):
        if (CONF / f"{candidate}.yaml").is_file():
            return candidate
        if (CONF / f"{candidate}_lab.yaml").is_file():  # a lab preset since named by the <part>_<scale> rule
            return f"{candidate}_lab"
    parts = value.split("_")
    for i in range(1, len(parts)):
        candidate = "_".join(parts[:i]) + "/" + "_".join(parts[i:])
        if (CONF / f"{candidate}.yaml").is_file():
            return candidate
    return None


def protocol1_era(table: Path) -> bool:
    """Whether a results table predates its study's protocol 2: it sits in no ``protocolN``
    folder while one of the folders above it, up to the study's ``results``, has ``protocol2``.
    Its preset is then the one kept as ``<name>_p1`` where that exists."""
    if not table.is_relative_to(HERE):
        return False
    if any(part.startswith("protocol") for part in table.relative_to(HERE).parts):
        return False
    folder = table.parent
    while folder != HERE and folder.name != "results":
        if (folder / "protocol2").is_dir():
            return True
        folder = folder.parent
    return (folder / "protocol2").is_dir()


def job_overrides(folder: str, protocol1: bool = False) -> tuple[list[str], str]:
    """(overrides, why not) of a job folder name (proxy.analysis.run_dirname's spelling);
    ``protocol1``: the result predates protocol 2, so its preset is the ``_p1`` one if kept."""
    name = JOB_PREFIX.sub("", folder)
    if "~" in name.split(",")[-1]:
        return [], "its folder name was cut to a hash"
    from proxy.analysis import split_overrides
    from proxy.config import RENAMED_KEYS

    overrides = []
    for item in split_overrides(name):
        key, _, value = item.partition("=")
        if key in RENAMED_KEYS:  # a key an older proxy had: today's name, same value
            key = RENAMED_KEYS[key]
            item = f"{key}={value}"
        if key.lstrip("+") == "experiment":
            preset = (protocol1 and current_preset(f"{value}_p1")) or current_preset(value)
            if preset is None:
                return [], f"no preset {value} today"
            item = f"{key}={preset}"
        overrides.append(item)
    return overrides, ""


def job_folder(row: dict[str, str]) -> str:
    """The job folder a committed run ran in: the component after the sweep folder."""
    parts = Path(row["path"]).parts
    sweep = row.get("sweep_id") or ""
    if sweep in parts and parts.index(sweep) + 1 < len(parts):
        return parts[parts.index(sweep) + 1]
    return next((p for p in reversed(parts) if JOB_PREFIX.match(p)), parts[-1])


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def plan(tables: Sequence[Path]) -> list[Job]:
    """The cheapest job of each table (by its committed wall time), cheapest first."""
    jobs = []
    for table in tables:
        rows = list(csv.DictReader(table.open(newline="")))
        by_job: dict[str, list[dict[str, str]]] = {}
        for row in rows:
            by_job.setdefault(job_folder(row), []).append(row)
        if not by_job:
            continue
        costs = {f: max((_number(r.get("wall_time_s", "")) for r in rs), default=math.nan) for f, rs in by_job.items()}
        folder = min(by_job, key=lambda f: costs[f] if math.isfinite(costs[f]) else math.inf)
        overrides, why = job_overrides(folder, protocol1_era(table))
        jobs.append(Job(table, folder, overrides, by_job[folder], costs[folder], why))
    return sorted(jobs, key=lambda j: j.cost_s if math.isfinite(j.cost_s) else math.inf)


def _key(lr: object, seed: object) -> tuple[str, str]:
    return (f"{_number(str(lr)):.6g}", str(seed))


def compare(committed: dict[str, str], now: dict[str, object]) -> str:
    """same / close / differs / preset changed for one run."""
    for field_ in ("steps_planned", "n_params"):
        a, b = _number(committed.get(field_, "")), _number(str(now.get(field_)))
        if math.isfinite(a) and math.isfinite(b) and a != b:
            return f"preset changed ({field_} {a:g} then, {b:g} now)"
    worst = 0.0
    for field_ in ("final_val_loss", "final_train_loss"):
        a, b = _number(committed.get(field_, "")), _number(str(now.get(field_)))
        if not (math.isfinite(a) and math.isfinite(b)):
            if math.isfinite(a) != math.isfinite(b):
                return f"differs ({field_} {a:.6g} then, {b:.6g} now)"
            continue
        worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
    if worst <= SAME:
        return "same"
    return f"{'close' if worst <= CLOSE else 'differs'} (largest relative difference {worst:.2g})"


def rerun(job: Job, out: Path) -> Outcome:
    """Train the job with today's code into ``out`` and compare its runs with the committed rows."""
    if job.why_not:
        return Outcome(job, "not run", job.why_not)
    from proxy.records import find_runs, load_run

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "proxy.train", *job.overrides, f"hydra.run.dir={out}", "train.progress=false"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Outcome(job, "failed", last, wall_s=wall)
    now = {}
    for run_dir in find_runs([out]):
        run = load_run(run_dir)
        s = run.summary
        now[_key(run.config_value("optim.lr"), run.config_value("train.seed"))] = {
            "final_val_loss": s.final_val_loss,
            "final_train_loss": s.final_train_loss,
            "steps_planned": s.steps_planned,
            "n_params": s.n_params,
        }
    runs = []
    for row in job.rows:
        key = _key(row.get("lr"), row.get("seed"))
        runs.append((f"lr={key[0]}, seed={key[1]}", compare(row, now[key]) if key in now else "missing now"))
    statuses = [r.split(" (")[0] for _, r in runs]
    for status in ("failed", "missing now", "preset changed", "differs", "close", "same"):
        if status in statuses:
            return Outcome(job, status, "", runs, wall)
    return Outcome(job, "failed", "no runs compared", runs, wall)


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "proxy", "conf"], cwd=REPO, capture_output=True, text=True
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def _where(table: Path) -> str:
    """A results table named by its folder, relative to experiments/ where it lies there."""
    folder = table.parent
    return folder.relative_to(HERE).as_posix() if folder.is_relative_to(HERE) else folder.as_posix()


TITLE = "# Do the committed results still come out of today's code?"
HEADER = ["| result | job re-run | then (s) | now (s) | outcome | runs |", "|---|---|---|---|---|---|"]


def report(outcomes: list[Outcome], planned: int, wall: float, previous: str = "") -> str:
    """The table, with ``previous`` (an earlier table, e.g. of a pass over other results) merged
    in: its pass lines kept, its rows kept unless this pass re-ran the same result."""
    import torch

    passes = [
        line.removeprefix("- ")
        for line in previous.splitlines()
        if line.removeprefix("- ").startswith("`python experiments/reproduce.py`")
    ]
    rows = {line.split(" | ")[0]: line for line in previous.splitlines() if line.startswith("| ") and "---" not in line}
    rows.pop(HEADER[0].split(" | ")[0], None)
    passes.append(
        f"`python experiments/reproduce.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, proxy at "
        f"{_commit()}, torch {torch.__version__}, {platform.machine()} CPU ({os.cpu_count()} cores), "
        f"one thread per job; {sum(o.status != 'not run' for o in outcomes)} of {planned} tables' cheapest "
        f"jobs re-run, {wall / 60:.1f} min."
    )
    for o in outcomes:
        table = _where(o.job.table)
        key = f"| {table}"
        if o.status == "not run" and key in rows:
            continue  # an earlier pass ran it: keep that
        runs = "; ".join(f"{k}: {v}" for k, v in o.runs) if o.runs else o.detail
        rows[key] = f"| {table} | `{o.job.folder}` | {o.job.cost_s:.0f} | {o.wall_s:.0f} | **{o.status}** | {runs} |"
    body = [rows[k] for k in sorted(rows)]
    return "\n".join([TITLE, "", *(f"- {line}" for line in passes), "", *HEADER, *body]) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", action="append", default=[], help="only the results whose path contains this (repeatable)"
    )
    parser.add_argument("--budget", type=float, default=math.inf, help="seconds of committed wall time to re-run")
    parser.add_argument("--jobs", type=int, default=2, help="jobs at once (one thread each)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "reproduce", help="where the re-runs go")
    parser.add_argument("--out", type=Path, default=HERE / "reproduction.md", help="the table written")
    args = parser.parse_args(argv)
    tables = sorted(
        p
        for p in HERE.glob("**/results/**/runs.csv")
        if not args.only or any(part in p.relative_to(HERE).as_posix() for part in args.only)
    )
    jobs = plan(tables)
    chosen, spent = [], 0.0
    for job in jobs:
        if spent + (job.cost_s if math.isfinite(job.cost_s) else 0.0) > args.budget:
            continue
        chosen.append(job)
        spent += job.cost_s if math.isfinite(job.cost_s) else 0.0
    for job in jobs:
        mark = "run " if job in chosen else "skip"
        what = job.why_not or " ".join(job.overrides)
        print(f"{mark} {job.cost_s:7.0f} s  {_where(job.table)}: {what}")
    if args.dry_run:
        return 0
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(lambda ij: rerun(ij[1], args.work / stamp / str(ij[0])), enumerate(chosen)))
    outcomes += [Outcome(j, "not run", "past the budget") for j in jobs if j not in chosen]
    previous = args.out.read_text() if args.out.is_file() else ""
    text = report(outcomes, len(jobs), time.perf_counter() - start, previous)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
