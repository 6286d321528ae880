"""The device check's supervisor: one process per part under its cap, results written after
each part (.json and .md), the command line."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from benchmarks.gpu_check.parts import PART_FUNCTIONS, QUICK_TUNING_PARTS
from benchmarks.gpu_check.processes import kill_live_groups, run_capped
from benchmarks.gpu_check.recorder import RESULTS, Recorder, Setting, read_json, write_json
from proxy.records import atomic_write_text

# part: (name, what it answers, cap in seconds on a GPU, cap on a CPU dry run). The GPU caps sum
# to 525 s, set from the first H200 run (2026-12-04, cold caches: part 1 took 69 s, part 4 about
# 125 s, part 5 43 s with proxy-train cut at 20 s): with the parent's start and the wheels' install
# the whole check stays inside 10 minutes, and a 15-minute lease keeps a few minutes to rerun one
# part. Part 2 compiles every autotuning candidate of the attention kernels (two head dims), part 3
# compiles the 124m model. The phase times each part records are what a second try sets --cap from.
PARTS = {
    1: ("correctness", "kernels against the references at real shapes; the kernel tests on CUDA", 85, 240),
    2: ("kernel speed", "attention and cross-entropy against SDPA, torch and Liger", 110, 240),
    3: ("end to end", "the 124m preset: tokens/s, MFU, the cost of the diagnostics", 100, 240),
    4: ("vectorized sweep", "K=8 LRs in one process against 8 runs one after another", 150, 240),
    5: ("a finding end to end", "a shrunken GPU preset: train, report, verdict", 80, 240),
}


# ============================================================================================
# The run: one process per part, results written after each
# ============================================================================================
def versions() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["driver_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        info["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    return info


def run_part(number: int, dry_run: bool, result_path: Path, deadline: Optional[float] = None) -> int:
    """In the child process: one part, its JSON written whatever happens. A part that raises keeps
    every check, row and phase time it had recorded, beside the error."""
    started = time.perf_counter()
    rec = Recorder(Setting(dry_run, deadline), result_path)
    try:
        PART_FUNCTIONS[number](rec.setting, rec)
        result = {"status": "ok", **rec.data}
    except Exception as exc:  # the part failed: say how, keep what it measured, let the parent go on
        result = {
            "status": "failed",
            **rec.data,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
    result["in_process_s"] = round(time.perf_counter() - started, 1)
    write_json(result_path, result)
    return 0 if result["status"] == "ok" else 1


def launch_part(number: int, dry_run: bool, cap: Optional[float] = None) -> dict[str, Any]:
    """In the parent: one part in its own process (and process group) under its cap."""
    name, _, gpu_cap, cpu_cap = PARTS[number]
    cap = cap if cap is not None else (cpu_cap if dry_run else gpu_cap)
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1" if dry_run else "0"
    env.setdefault("WANDB_MODE", "disabled")
    if number in QUICK_TUNING_PARTS:  # correctness, not speed: one kernel config, no autotuning
        env["PROXY_TRITON_TUNING"] = "quick"
    with tempfile.TemporaryDirectory(prefix="gpu-check-part-") as tmp:
        result_path = Path(tmp) / "result.json"
        started = time.time()
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.gpu_check",
            "--part",
            str(number),
            "--result",
            str(result_path),
            "--deadline",
            f"{started + cap:.3f}",
        ] + (["--dry-run"] if dry_run else [])
        try:
            _, stderr, code = run_capped(cmd, env, timeout=cap, own_group=True)
            timed_out = False
        except subprocess.TimeoutExpired as exc:
            stderr, code, timed_out = exc.stderr or "", None, True
        result = read_json(result_path)  # what the part recorded, however far it got
    seconds = round(time.time() - started, 1)
    running = result.pop("running", None)  # the phase the part was in when it stopped, if unfinished
    during = f", during phase '{running}'" if running else ""
    if timed_out:
        result.update(status="timeout", error=f"over its cap of {cap:g} s{during}")
    elif result.get("status") not in ("ok", "failed"):
        result.update(status="crashed", error=f"exit {code} before the part finished{during}")
    if result["status"] != "ok":
        result["stderr_tail"] = stderr[-2000:]
    return {"part": number, "name": name, "cap_s": cap, "seconds": seconds, **result}


def result_stem(device: str, when: dt.datetime, parts: list[int]) -> str:
    """gpu-check-<device>-<date>-<HHMMSS>[-parts-N-M]: a rerun of some parts on the same day
    writes beside the full record, never over it."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    tag = "" if sorted(parts) == sorted(PARTS) else "-parts-" + "-".join(map(str, parts))
    return f"gpu-check-{name}-{when:%Y-%m-%d-%H%M%S}{tag}"


def plan_line(parts: list[int], caps: dict[int, float]) -> str:
    total = sum(caps[p] for p in parts)
    return (
        f"plan: parts {' '.join(map(str, parts))} under caps "
        f"{' + '.join(f'{caps[p]:g}' for p in parts)} = {total:g} s (each part's process start included), "
        f"results written after each part; a part over its cap is killed and recorded, the rest go on. "
        f"Rerun one alone: --parts N [--cap N=SECONDS]"
    )


def to_markdown(record: dict[str, Any]) -> str:
    v = record["versions"]
    lines = [
        f"# Device check: {v['device']}",
        "",
        f"{record['date']}; torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, "
        f"Python {v['python']}{'; DRY RUN on a CPU (targets not judged)' if record['dry_run'] else ''}. "
        f"Command: `{record['command']}`; {record['seconds']:.0f} s in all.",
        "",
    ]
    for part in record["parts"]:
        lines += _part_markdown(part)
    return "\n".join(lines) + "\n"


def _part_markdown(part: dict[str, Any]) -> list[str]:
    lines = [
        f"## {part['part']}. {part['name']}: {part['status']} ({part.get('seconds', '?')} s of {part['cap_s']:g} s)",
        "",
    ]
    if part["status"] != "ok":
        lines += [f"> {part.get('error', '')}", ""]
    if part.get("phases"):
        lines += [
            "Phases: "
            + ", ".join(
                f"{p['phase']} {p['seconds']} s" + (" (raised)" if p.get("raised") else "") for p in part["phases"]
            )
            + ".",
            "",
        ]
    lines += [f"- {note}" for note in part.get("notes", [])] + ([""] if part.get("notes") else [])
    if part.get("checks"):
        lines += ["| check | measured | target | holds |", "|---|---|---|---|"]
        for c in part["checks"]:
            holds = {True: "yes", False: "**no**", None: "-"}[c["passed"]]
            lines.append(f"| {c['check']} | {c['measured']} | {c['target']} | {holds} |")
        lines.append("")
    return lines


def _cap(text: str) -> tuple[int, float]:
    part, _, seconds = text.partition("=")
    if int(part) not in PARTS or not seconds:
        raise argparse.ArgumentTypeError(f"--cap wants PART=SECONDS with PART in {list(PARTS)}, not {text!r}")
    return int(part), float(seconds)


@contextmanager
def _parts_die_with_us() -> Iterator[None]:
    """SIGTERM, SIGINT or SIGHUP to the parent, or its exit however it comes, kills the running
    part's process group: no part outlives the check to hold the GPU during a rerun."""

    def on_signal(signum: int, _frame: Any) -> None:
        kill_live_groups()
        raise SystemExit(128 + signum)

    wanted = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {}
    for sig in wanted:
        try:
            previous[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread: leave the handlers alone
            pass
    try:
        yield
    finally:
        kill_live_groups()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on a CPU, tiny shapes, targets not judged")
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the JSON and markdown (default benchmarks/results)"
    )
    parser.add_argument("--parts", type=int, nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument(
        "--cap",
        type=_cap,
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help="another time cap for a part (a second try, from the first one's phase times)",
    )
    parser.add_argument("--part", type=int, choices=list(PARTS), help=argparse.SUPPRESS)  # the child
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return run_part(args.part, args.dry_run, args.result, args.deadline)
    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks.gpu_check: no CUDA device here; --dry-run checks the script on a CPU", file=sys.stderr)
        return 2

    started = time.perf_counter()
    caps = {n: float(part[3 if args.dry_run else 2]) for n, part in PARTS.items()} | dict(args.cap)
    print(plan_line(args.parts, caps), flush=True)
    info = versions()
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(info["device"], dt.datetime.now(), args.parts)
    paths = (out / f"{stem}.json", out / f"{stem}.md")
    record = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "dry_run": args.dry_run,
        "versions": info,
        "command": " ".join(["python -m benchmarks.gpu_check", *(argv if argv is not None else sys.argv[1:])]),
        "caps_s": {str(n): caps[n] for n in args.parts},
        "parts": [],
        "seconds": 0.0,
    }
    with _parts_die_with_us():
        for number in args.parts:
            print(f"part {number} ({PARTS[number][0]}, cap {caps[number]:g} s) ...", flush=True)
            part = launch_part(number, args.dry_run, caps[number])
            record["parts"].append(part)
            record["seconds"] = round(time.perf_counter() - started, 1)
            write_json(paths[0], record)  # after every part
            atomic_write_text(paths[1], to_markdown(record))
            missed = [c["check"] for c in part.get("checks", []) if c["passed"] is False]
            print(
                f"part {number}: {part['status']} in {part['seconds']} s"
                + (f"; {len(missed)} targets missed" if missed else ""),
                flush=True,
            )
    print(paths[1].read_text())
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0 if all(p["status"] == "ok" for p in record["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
