"""The science queue: what a GPU lease runs, in one command, within the device time it has.

    python -m benchmarks.science_run --budget 480 --out "$OUT"            # a lease: probe, then the queue
    python -m benchmarks.science_run --budget 120 --out DIR --dry-run     # a CPU, tiny shapes (the tests)

A lease is ~15 minutes of device time, at most 10 minutes a command (README "Running a lease").
In order, each step in its own process group, killed with everything it started when its cap
ends or this command stops:

1. the performance probe (``--probe-s``, <= 90 s; ``--no-probe`` skips it): tokens/s of whole
   training steps of one run and of an 8-member sweep at 1m / 5m / 20m (tiny on a CPU), against
   the targets of issue 29 (a 1m-20m step <= 5 ms; 8 members <= 2x one member's step time), eager;
   at the smallest size, how often the host waits for the device between logging steps (CUDA's
   sync debug mode, target 0) with no remedy, skip-step and ZClip (which decide on the device),
   one run and skip-step over 8 members; then one run compiled, default mode and CUDA graphs
   (``reduce-overhead``), size by size, with its compile time and how many graphs fell back to
   plain launches, until the cap;
2. each study of benchmarks/science/queue.yaml, highest value first: admitted only where the
   committed rate table (benchmarks/science/rates.json, by device kind) predicts it finishes in the
   budget left; trained as its preset's Hydra multirun; after its first ~50 steps the finish is
   projected from the measured rate, and a study that would overrun is stopped, keeping what it
   measured; then judged on the device by its finding's proxy-verdict (``--no-figures``: the
   figures are drawn at home from the packed runs).

After every step ``science-summary.json`` and ``.md`` are rewritten in --out (device, versions,
each study's prediction, measured rate, seconds, status, verdict), and each study is packed as
``<study>.tar.gz`` (its run records without checkpoints, its report and verdict; metrics thinned
if the archive would pass 16 MiB; a split study's parts share one archive, rewritten as each part
ends): at most 8 plain-named files come back from a lease.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
SCIENCE = ROOT / "benchmarks" / "science"
MAX_FILE_BYTES = 16 << 20  # what the device tool brings back per file
MAX_FILES = 8
VERDICT_S = 90.0  # proxy-verdict's cap (--verdict-s), kept back from a study's own
STARTUP_S, COMPILE_S = 20.0, 40.0  # per job: building, first compilation (proxy.train.estimate)
PROJECT_AFTER_STEPS = 50
POLL_S = 2.0
LEFT_OUT = ("checkpoints", "rollback", "wandb", "tensorboard")  # never packed: states, sinks


# --------------------------------------------------------------------------------------------
# What runs: the queue, and what each study will cost
# --------------------------------------------------------------------------------------------
@dataclass
class Study:
    name: str
    preset: str
    finding: str
    why: str = ""
    overrides: list[str] = field(default_factory=list)  # what makes this part of the preset (always applied)
    dry_run: list[str] = field(default_factory=list)  # what shrinks it for --dry-run on a CPU
    parts: list[str] = field(default_factory=list)  # every part of a split study (names), this one included

    def arguments(self, dry_run: bool) -> list[str]:
        return [f"+experiment={self.preset}", *self.overrides, *(self.dry_run if dry_run else [])]


@dataclass
class Job:
    overrides: list[str]
    model: str
    members: int
    steps: int
    tokens_per_step: int
    compiled: bool
    modelled_s: float  # proxy.train.estimate's model
    fixed_s: float = 0.0  # of which startup and first compilation (no calibration applies to them)

    @property
    def member_tokens(self) -> int:
        return self.members * self.steps * self.tokens_per_step


def load_queue(path: Path) -> list[Study]:
    from proxy.records import read_yaml

    data = read_yaml(path)
    return [Study(**entry) for entry in data["studies"]]


def device_kind() -> str:
    """'H200', 'H100', another GPU's name as it reports it, or 'cpu'."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    return next((kind for kind in ("H200", "H100") if kind in name.upper()), name)


def plan(study: Study, dry_run: bool, gpu: str) -> list[Job]:
    """The study's jobs as its preset's multirun expands them, each with its cost."""
    from proxy.train.estimate import estimate, job_config, sweep_jobs

    jobs = []
    for job in sweep_jobs(study.arguments(dry_run)):
        cfg = job_config(job)
        sw = cfg.sweep
        members = max(1, len(sw.lrs or [0]) * len(sw.seeds or [0]) * len(sw.weight_decays or [0]))
        compiled = str(cfg.train.compile).lower() == "true" or (
            str(cfg.train.compile).lower() == "auto" and gpu != "cpu" and cfg.train.device != "cpu"
        )
        est = estimate(cfg, gpu if gpu != "cpu" else "H100", members=members, compiled=compiled)
        jobs.append(
            Job(
                [o for o in job if not o.startswith("+experiment=")],
                cfg.model.name,
                members,
                cfg.train.steps,
                cfg.train.batch_size * cfg.train.seq_len,
                compiled,
                est.seconds,
                est.fixed_s,
            )
        )
    return jobs


def predict(jobs: list[Job], rates: dict[str, Any], kind: str) -> tuple[float, str]:
    """(seconds, how): a measured rate of the same model and members where the table has one,
    else the modelled time over the device's calibration."""
    device = rates["devices"].get(kind) or rates["devices"]["H100"]  # an unknown GPU: the slower card's figures
    total, how = 0.0, set()
    for job in jobs:
        same = [
            r
            for r in device["rates"]
            if r["model"] == job.model
            and r["members"] == job.members
            and bool(r.get("compiled")) == job.compiled
            and r.get("mode", "default") in ("default", "eager")  # a CUDA-graph rate is not what a preset gets
        ]
        if same:
            best = min(same, key=lambda r: abs(math.log(r["tokens_per_step"] / job.tokens_per_step)))
            total += job.member_tokens / best["tokens_per_s"] + STARTUP_S + (COMPILE_S if job.compiled else 0.0)
            how.add("measured rate")
        else:
            calibration = device["calibration"]["ensemble" if job.members > 1 else "single"]
            total += (job.modelled_s - job.fixed_s) / calibration + job.fixed_s  # the rate is calibrated
            how.add(f"model / calibration {calibration:g}")
    return total, ", ".join(sorted(how))


# --------------------------------------------------------------------------------------------
# Running a study: capped, watched, stopped before it overruns
# --------------------------------------------------------------------------------------------
def _env(dry_run: bool) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    if dry_run:
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def _member_tokens_done(sweep_dir: Path) -> tuple[int, int]:
    """(member-tokens trained so far, the most steps any run has logged) under a sweep dir."""
    tokens, steps = 0, 0
    for metrics in sweep_dir.rglob("metrics.jsonl"):
        last = None
        with contextlib.suppress(OSError):
            for line in metrics.read_bytes().splitlines()[-50:]:
                with contextlib.suppress(ValueError):
                    row = json.loads(line)
                    if isinstance(row, dict) and "tokens" in row:
                        last = row
        if last is not None:
            tokens += int(last["tokens"])
            steps = max(steps, int(last.get("step", 0)))
    return tokens, steps


def gpu_memory_used_mib() -> Optional[float]:
    """Memory in use on the GPU, as nvidia-smi reports it (whatever process holds it); None
    without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return max(float(v) for v in out.stdout.split()) if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_sweep(study: Study, jobs: list[Job], sweep_dir: Path, cap: float, dry_run: bool) -> dict[str, Any]:
    """Train the study's multirun in ``sweep_dir`` for at most ``cap`` seconds; stop it early
    where, after its first steps, the measured rate says it would not finish in time."""
    planned = sum(job.member_tokens for job in jobs)
    cmd = [
        sys.executable,
        "-m",
        "proxy.train",
        "-m",
        *study.arguments(dry_run),
        f"hydra.sweep.dir={sweep_dir}",
        "train.progress=false",
    ]
    start = time.monotonic()
    log = (sweep_dir.parent / f"{study.name}.train.log").open("w")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(dry_run), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    status, first_row_at, rate, peak_mib = "completed", None, None, None
    try:
        while True:
            try:  # back as soon as the sweep ends (a lease's seconds), else every POLL_S to watch it
                proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            elapsed = time.monotonic() - start
            used = gpu_memory_used_mib()
            peak_mib = max(peak_mib or 0.0, used) if used is not None else peak_mib
            done, steps = _member_tokens_done(sweep_dir)
            if done and first_row_at is None:
                first_row_at = elapsed
            if elapsed > cap:
                status = f"stopped at its cap of {cap:.0f} s"
                _kill(proc)
                break
            if first_row_at is not None and steps >= PROJECT_AFTER_STEPS and elapsed > first_row_at:
                rate = done / (elapsed - first_row_at)
                projected = elapsed + (planned - done) / rate
                if projected > cap:
                    status = f"stopped: would overrun (projected {projected:.0f} s of a {cap:.0f} s cap)"
                    _kill(proc)
                    break
    finally:
        if proc.poll() is None:
            _kill(proc)
        log.close()
    seconds = time.monotonic() - start
    done, _ = _member_tokens_done(sweep_dir)
    if status == "completed" and proc.returncode != 0:
        status = f"failed (exit {proc.returncode}; see {study.name}.train.log)"
    if done and first_row_at is not None and seconds > first_row_at:
        rate = done / (seconds - first_row_at)
    return {
        "status": status,
        "seconds": round(seconds, 1),
        "member_tokens": done,
        "planned_member_tokens": planned,
        "member_tokens_per_s": round(rate, 1) if rate else None,
        "first_row_s": round(first_row_at, 1) if first_row_at is not None else None,  # building + compiling
        "peak_gpu_memory_mib": peak_mib,
    }


def judge(study: Study, sweep_dirs: list[Path], cap: float, dry_run: bool) -> dict[str, Any]:
    """The finding's proxy-verdict on what was trained (every part of a split study), on the device."""
    sweep_dir = sweep_dirs[0]
    cmd = [
        sys.executable,
        "-m",
        "proxy.verdict",
        str(ROOT / study.finding),
        *map(str, sweep_dirs),
        "--out",
        str(sweep_dir / "report"),
        "--no-figures",  # ~10 s of device time per verdict; drawn at home from the archive's runs
    ]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=_env(dry_run), capture_output=True, text=True, timeout=cap)
    except subprocess.TimeoutExpired:
        return {"verdict": None, "verdict_error": f"proxy-verdict ran past {cap:.0f} s"}
    verdict_json = sweep_dir / "report" / "verdict.json"
    if out.returncode != 0 or not verdict_json.is_file():
        return {"verdict": None, "verdict_error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return {"verdict": json.loads(verdict_json.read_text()).get("label")}


# --------------------------------------------------------------------------------------------
# What comes back: one archive per study, a summary
# --------------------------------------------------------------------------------------------
def archive_name(study: Study) -> str:
    """The file a study comes back in: a split study's parts share their first part's archive."""
    return f"{study.parts[0] if study.parts else study.name}.tar.gz"


def pack(sweep_dirs: list[Path], archive: Path) -> dict[str, Any]:
    """The ``sweep_dirs`` (a study, or every trained part of a split one) as one .tar.gz of run
    records, report and verdict (no checkpoints, no state files), under MAX_FILE_BYTES: metrics
    rows thinned (every k-th kept, events and the last row always) until it fits."""
    for keep_every in (1, 2, 4, 8, 16, 32, 64):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for sweep_dir, path in sorted((d, p) for d in sweep_dirs for p in d.rglob("*")):
                relative = path.relative_to(sweep_dir)
                if (
                    path.is_symlink()
                    or not path.is_file()
                    or path.suffix == ".pt"
                    or any(part in LEFT_OUT for part in relative.parts)
                ):
                    continue
                data = path.read_bytes()
                if path.name == "metrics.jsonl" and keep_every > 1:
                    data = _thin(data, keep_every)
                info = tarfile.TarInfo(str(Path(sweep_dir.name) / relative))
                info.size, info.mtime = len(data), int(path.stat().st_mtime)
                tar.addfile(info, io.BytesIO(data))
        if buffer.tell() <= MAX_FILE_BYTES:
            from proxy.records import atomic_write_bytes

            atomic_write_bytes(archive, buffer.getvalue())
            return {"archive": archive.name, "bytes": buffer.tell(), "metrics_kept_every": keep_every}
    return {"archive": None, "error": "over 16 MiB even with every 64th metrics row"}


def _thin(data: bytes, keep_every: int) -> bytes:
    lines = [ln for ln in data.splitlines() if ln.strip()]
    kept = [ln for i, ln in enumerate(lines) if i % keep_every == 0 or b'"event"' in ln or i == len(lines) - 1]
    return b"\n".join(kept) + b"\n"


def write_summary(out: Path, record: dict[str, Any]) -> None:
    from proxy.records import atomic_write_text

    atomic_write_text(out / "science-summary.json", json.dumps(record, indent=2, default=str) + "\n")
    lines = [
        f"# Science run: {record['device']} ({record['kind']}), {record['date']}",
        "",
        f"Budget {record['budget_s']:.0f} s; used {record['seconds']:.0f} s. Versions: "
        + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if k != "device"),
        "",
    ]
    if record.get("probe"):
        lines += [
            "## Performance probe",
            "",
            "| shape | step ms | tokens/s | target | met | build + first steps s | CUDA graph skips | host waits |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['shape']} | {r['step_ms']:.2f} | {r['tokens_per_s']:,.0f} | {r['target']} | {r['met']} "
            f"| {r.get('warmup_s', float('nan')):.1f} | {r.get('cuda_graph_skips', '')} | {r.get('host_waits', '')} |"
            for r in record["probe"].get("rows", [])
        ]
        lines += [""] + [f"- {note}" for note in record["probe"].get("notes", [])] + [""]
    lines += [
        "## Studies",
        "",
        "| study | predicted s | status | seconds | member-tokens/s | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for s in record["studies"]:
        lines.append(
            f"| {s['name']} | {s['predicted_s']:.0f} ({s['predicted_by']}) | {s['status']} | "
            f"{s.get('seconds', '—')} | {s.get('member_tokens_per_s') or '—'} | "
            f"{s.get('verdict') or s.get('verdict_error') or s.get('verdict_note') or '—'} |"
        )
    atomic_write_text(out / "science-summary.md", "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# The performance probe
# --------------------------------------------------------------------------------------------
PROBE = """
import json, sys, tempfile, time
from pathlib import Path
import torch
from proxy.config import Config, as_dict, to_config
from proxy.train import RunInfo, Trainer
from proxy.train.runtime import cuda_graph_skips
dry = sys.argv[1] == "1"
sizes = ["tiny"] if dry else ["1m", "5m", "20m"]
batch, seq, steps, warm = (4, 32, 5, 2) if dry else (16, 256, 30, 10)
def config(model, members, mode, remedy="none"):
    from omegaconf import OmegaConf
    c = as_dict(Config())
    c["model"].update(OmegaConf.to_container(OmegaConf.load(f"conf/model/{model}.yaml")))
    eager = mode == "eager"
    c["train"].update(batch_size=batch, seq_len=seq, progress=False, steps=10_000,
                      compile="false" if eager else "true", compile_mode="default" if eager else mode)
    c["remedy"]["kind"] = remedy
    if dry:
        c["train"]["device"] = "cpu"
    if members > 1:
        c["sweep"]["lrs"] = [1e-3 * (1 + i) for i in range(members)]
    return to_config(c)
def rate(model, members, mode, remedy="none", count_waits=False):
    # count_waits: how often the host waits on the device between logging steps (CUDA's sync debug
    # mode warns at each wait; None off a GPU)
    import warnings
    c = config(model, members, mode, remedy)
    skips = cuda_graph_skips()
    with tempfile.TemporaryDirectory() as tmp:
        built = time.perf_counter()
        t = Trainer(c, RunInfo(Path(tmp), "probe"))
        for s in range(warm):  # the first steps compile, where compiled
            t.train_step(s, logging_step=False)
        cuda = t.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn" if count_waits else 0)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for s in range(warm, warm + steps):
                t.train_step(s, logging_step=False)
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        t.release()
    waits = [str(w.message) for w in caught if "synchroniz" in str(w.message)] if cuda and count_waits else None
    return elapsed / steps, members * steps * batch * seq / elapsed, start - built, cuda_graph_skips() - skips, waits
def syncs(model, members, remedy):
    ms, tps, _, _, waits = rate(model, members, "eager", remedy, count_waits=True)
    r = {"shape": f"{model} x{members}, {batch}x{seq}, eager, remedy {remedy}: host waits", "model": model,
         "members": members, "mode": "eager", "remedy": remedy, "step_ms": 1e3 * ms, "tokens_per_s": tps,
         "host_waits": None if waits is None else len(waits), "first_wait": waits[0][:200] if waits else None,
         "target": "0 between logging steps", "met": None if waits is None else not waits}
    print(json.dumps(r), flush=True)
    return r
def row(model, members, mode, targets):
    ms, tps, warmup_s, skips, _ = rate(model, members, mode)
    r = {"shape": f"{model} x{members}, {batch}x{seq}, {mode}", "model": model, "members": members, "mode": mode,
         "compiled": mode != "eager", "tokens_per_step": batch * seq, "step_ms": 1e3 * ms, "tokens_per_s": tps,
         "warmup_s": warmup_s, "cuda_graph_skips": skips, **targets(ms)}
    print(json.dumps(r), flush=True)
    return r
# eager first (the issue's targets), then the compiled modes at the smallest size, then the rest:
# a probe stopped at its cap keeps every row it printed
one = {}
for model in sizes:
    one[model] = row(model, 1, "eager", lambda ms: {"target": "<= 5 ms", "met": ms <= 5e-3})["step_ms"]
    row(model, 8, "eager", lambda ms: {"target": "<= 2x one member's step", "met": ms <= 2e-3 * one[model]})
    if model == sizes[0]:  # no host wait between logging steps, with the remedies that decide on the device
        for members, remedy in ((1, "none"), (1, "skip_step"), (1, "zclip"), (8, "skip_step")):
            syncs(model, members, remedy)
for model in [] if dry else sizes:  # a CPU's inductor compile alone would pass a dry run's cap
    for mode in ("default", "reduce-overhead"):
        row(model, 1, mode, lambda ms: {"target": "<= 5 ms", "met": ms <= 5e-3})
"""


def probe(cap: float, dry_run: bool) -> dict[str, Any]:
    """Step times of one run and of 8 members at 1m / 5m / 20m (tiny on a CPU), each row kept as
    it is measured (a probe past its cap keeps the rows it had)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, "1" if dry_run else "0"],
        cwd=ROOT,
        env=_env(dry_run),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    notes = []
    try:
        out, err = proc.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, err = proc.communicate()
        notes.append(f"stopped at its cap of {cap:.0f} s")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if proc.returncode not in (0, None) and not notes:
        notes.append(f"failed: {(err.strip().splitlines() or ['no output'])[-1][:300]}")
    return {"rows": rows, "notes": notes}


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.science_run", description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, required=True, help="seconds this command may take in all")
    parser.add_argument("--out", type=Path, required=True, help="where the summary and the archives go ($OUT)")
    parser.add_argument("--queue", type=Path, default=SCIENCE / "queue.yaml")
    parser.add_argument("--rates", type=Path, default=SCIENCE / "rates.json")
    parser.add_argument("--only", nargs="*", default=None, help="run only these studies (by name)")
    parser.add_argument("--probe-s", type=float, default=90.0, help="the performance probe's cap")
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--reserve-s", type=float, default=20.0, help="kept back for packing and the summary")
    parser.add_argument("--verdict-s", type=float, default=VERDICT_S, help="proxy-verdict's cap per study")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU at tiny shapes (the tests)")
    args = parser.parse_args(argv)

    import datetime as dt

    from benchmarks.gpu_check.supervisor import versions

    started = time.monotonic()
    deadline = started + args.budget - args.reserve_s
    kind = "cpu" if args.dry_run else device_kind()
    info = versions()
    args.out.mkdir(parents=True, exist_ok=True)
    rates = json.loads(args.rates.read_text())
    record: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "device": info["device"],
        "kind": kind,
        "versions": info,
        "budget_s": args.budget,
        "dry_run": args.dry_run,
        "command": " ".join(["python -m benchmarks.science_run", *(argv or sys.argv[1:])]),
        "probe": None,
        "studies": [],
        "rates_measured": [],
        "seconds": 0.0,
    }

    def save() -> None:
        record["seconds"] = round(time.monotonic() - started, 1)
        write_summary(args.out, record)

    if not args.no_probe:
        cap = min(args.probe_s, max(0.0, deadline - time.monotonic()))
        record["probe"] = probe(cap, args.dry_run)
        record["rates_measured"] += [
            {k: r[k] for k in ("model", "members", "tokens_per_step", "tokens_per_s", "compiled", "mode")}
            for r in record["probe"]["rows"]
            if "host_waits" not in r  # the rate table holds plain runs; the host-wait rows carry a remedy
        ]
        save()
    studies = [s for s in load_queue(args.queue) if args.only is None or s.name in args.only]
    with tempfile.TemporaryDirectory(prefix="science-") as work:
        for study in studies:
            jobs = plan(study, args.dry_run, kind)
            predicted, how = predict(jobs, rates, kind)
            left = deadline - time.monotonic()
            entry: dict[str, Any] = {
                "name": study.name,
                "preset": study.preset,
                "finding": study.finding,
                "jobs": [asdict(j) for j in jobs],
                "predicted_s": predicted,
                "predicted_by": how,
            }
            record["studies"].append(entry)
            trained = {s["name"] for s in record["studies"] if s.get("member_tokens")}
            judged_here = all(p in trained or p == study.name for p in study.parts)  # else judged later
            verdict_s = args.verdict_s if judged_here else 0.0
            packed = {s["archive"] for s in record["studies"] if s.get("archive")}
            if archive_name(study) not in packed and len(packed) >= MAX_FILES - 2:
                entry["status"] = "not run: no file left to bring it back in"
            elif predicted + verdict_s > left:
                entry["status"] = (
                    f"not admitted: predicted {predicted:.0f} s (+{verdict_s:.0f} s verdict), {left:.0f} s left"
                )
            else:
                sweep_dir = Path(work) / study.name
                entry.update(run_sweep(study, jobs, sweep_dir, left - verdict_s, args.dry_run))
                if entry["member_tokens"]:
                    ran = {s["name"] for s in record["studies"] if s.get("member_tokens")}
                    waiting = [p for p in study.parts if p not in ran]
                    if waiting:  # a split study is judged once all its parts have trained
                        entry["verdict_note"] = f"to be judged with {', '.join(waiting)}: proxy-verdict " + " ".join(
                            [study.finding, *(f"<{p}>" for p in study.parts)]
                        )
                    else:
                        cap = min(args.verdict_s, max(1.0, deadline - time.monotonic()))
                        others = [Path(work) / p for p in study.parts if p != study.name]
                        entry.update(judge(study, [sweep_dir, *others], cap, args.dry_run))
                    ran = {s["name"] for s in record["studies"] if s.get("member_tokens")}
                    dirs = [Path(work) / p for p in (study.parts or [study.name]) if p in ran]
                    entry.update(pack(dirs, args.out / archive_name(study)))  # a split study's parts together
                if entry.get("member_tokens_per_s"):
                    job = jobs[0]
                    record["rates_measured"].append(
                        {
                            "model": job.model,
                            "members": job.members,
                            "tokens_per_step": job.tokens_per_step,
                            "tokens_per_s": entry["member_tokens_per_s"],
                            "compiled": job.compiled,
                            "study": study.name,
                        }
                    )
            save()
    save()
    print(f"science run: {len(record['studies'])} studies in {record['seconds']:.0f} s -> {args.out}")
    for s in record["studies"]:
        print(f"  {s['name']}: {s['status']}" + (f", verdict {s['verdict']}" if s.get("verdict") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
