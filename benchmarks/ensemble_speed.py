"""How much faster is a vectorized sweep than the same runs one after another?

    python -m benchmarks.ensemble_speed [--sizes 1m 5m 20m] [--members 8] [--steps 10]
                                        [--batch-size 8] [--seq-len 128] [--reps 2] [--device auto]

For each model preset (conf/model/<size>.yaml) it trains K LR points twice, on the same data and
for the same steps: one after another with ``proxy.train.trainer.train`` (what a Hydra multirun does on
one device), and at once with ``proxy.train.ensemble.train_ensemble``. Both are timed end to end
(model build, evaluation at the first and last step, run records; no checkpoints), so the ratio
is what a user waits for. Each mode runs ``--reps`` times, alternating, and keeps its fastest
time: on a shared machine the minimum is the least disturbed measurement.

Writes benchmarks/results/ensemble-<device>-<date>.{json,md}: the table, device, versions,
settings, and the machine's load average before and after (other processes share the CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from proxy.config import Config, as_dict
from proxy.records import ENSEMBLE_TOKENS_PER_S, TOKENS_PER_S, TRAIN_LOSS, atomic_write_text, load_run
from proxy.train import train
from proxy.train.runtime import resolve_device
from proxy.train.trainer import train_ensemble

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def preset(size: str) -> dict[str, Any]:
    model = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{size}.yaml"))
    return {k: v for k, v in model.items() if k != "approx_params"}


def base_config(size: str, args: argparse.Namespace, compile_: Optional[bool] = None) -> dict[str, Any]:
    """``compile_``: None keeps train.compile=auto (on for CUDA); the device check turns it off,
    since 8 sequential compilations would be most of what it times."""
    cfg = as_dict(Config())
    cfg["model"].update(preset(size))
    cfg["train"].update(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        device=args.device,
        log_every=args.steps,
        eval_every=args.steps,
        eval_batches=1,
        progress=False,
        save_final=False,
    )
    if compile_ is not None:
        cfg["train"]["compile"] = str(compile_).lower()
    cfg["schedule"]["warmup_steps"] = args.steps // 2
    return cfg


def lr_grid(n: int) -> list[float]:
    """n log-spaced LRs over [3e-4, 1e-2]: wide enough to be a sweep, none diverges in a few steps."""
    return [float(f"{v:.3g}") for v in np.geomspace(3e-4, 1e-2, n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Wall time and this process's CPU time (the latter counts only while we hold a core)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "Timer":
        sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def time_sequential(cfg: dict, lrs: list[float], out: Path, device: torch.device) -> tuple[Timer, list[float]]:
    with Timer(device) as timer:
        for lr in lrs:
            train({**cfg, "optim": {**cfg["optim"], "lr": lr}}, out / f"lr={lr!r}")
    return timer, final_losses(out, lrs)


def final_losses(out: Path, lrs: list[float]) -> list[float]:
    return [load_run(out / f"lr={lr!r}").series(TRAIN_LOSS)[1][-1] for lr in lrs]


def loop_tokens_per_s(out: Path, lrs: list[float], ensemble: bool) -> float:
    """Training throughput inside the loop, from the records: the last log row's rate covers the
    steps after the first log (no model build, no evaluation). K runs back to back process
    tokens at the harmonic mean of their rates."""
    if ensemble:
        return load_run(out / f"lr={lrs[0]!r}").series(ENSEMBLE_TOKENS_PER_S)[1][-1]
    rates = [load_run(out / f"lr={lr!r}").series(TOKENS_PER_S)[1][-1] for lr in lrs]
    return len(rates) / sum(1.0 / r for r in rates)


def time_vectorized(cfg: dict, lrs: list[float], out: Path, device: torch.device) -> tuple[Timer, list[float]]:
    with Timer(device) as timer:
        train_ensemble({**cfg, "sweep": {**cfg["sweep"], "lrs": lrs}}, out)
    return timer, final_losses(out, lrs)


def measure(
    size: str, args: argparse.Namespace, device: torch.device, compile_: Optional[bool] = None
) -> dict[str, Any]:
    cfg = base_config(size, args, compile_)
    lrs = lr_grid(args.members)
    best = {"sequential": float("inf"), "vectorized": float("inf")}
    best_cpu = dict(best)
    best_loop = {"sequential": 0.0, "vectorized": 0.0}
    losses: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="ensemble-bench-") as tmp:
        for rep in range(args.reps):
            for mode, fn in (("sequential", time_sequential), ("vectorized", time_vectorized)):
                timer, final = fn(cfg, lrs, Path(tmp) / f"{mode}-{rep}", device)
                best[mode] = min(best[mode], timer.wall)
                best_cpu[mode] = min(best_cpu[mode], timer.cpu)
                rate = loop_tokens_per_s(Path(tmp) / f"{mode}-{rep}", lrs, ensemble=mode == "vectorized")
                best_loop[mode] = max(best_loop[mode], rate)
                losses[mode] = final
        n_params = load_run(Path(tmp) / "vectorized-0" / f"lr={lrs[0]!r}").summary.n_params
    tokens = args.members * args.steps * args.batch_size * args.seq_len
    diffs = [abs(a - b) / abs(b) for a, b in zip(losses["vectorized"], losses["sequential"])]
    return {
        "size": size,
        "params": n_params,
        "members": args.members,
        "lrs": lrs,
        "sequential_s": best["sequential"],
        "vectorized_s": best["vectorized"],
        "speedup": best["sequential"] / best["vectorized"],
        "sequential_tokens_per_s": tokens / best["sequential"],
        "vectorized_tokens_per_s": tokens / best["vectorized"],
        "sequential_cpu_s": best_cpu["sequential"],
        "vectorized_cpu_s": best_cpu["vectorized"],
        "cpu_time_speedup": best_cpu["sequential"] / best_cpu["vectorized"],
        "sequential_loop_tokens_per_s": best_loop["sequential"],
        "vectorized_loop_tokens_per_s": best_loop["vectorized"],
        "loop_speedup": best_loop["vectorized"] / best_loop["sequential"],
        # matmul rounding differs between batched and plain kernels; a loss spike amplifies it
        "median_rel_diff_final_train_loss": float(np.median(diffs)),
        "max_rel_diff_final_train_loss": max(diffs),
    }


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            lines = cpuinfo.read_text().splitlines()
            names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
            info["cpu"] = names[0] if names else None
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how many other processes wanted the CPU meanwhile."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def to_markdown(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        f"# Vectorized sweep vs one run after another ({m['device']}, {report['date']})",
        "",
        f"K={s['members']} LR points, {s['steps']} steps, batch {s['batch_size']} x {s['seq_len']} tokens, "
        f"fastest of {s['reps']} alternating repetitions; whole runs timed (build, eval at first and "
        f"last step, records; no checkpoints). *Speedup*: wall time, whole runs. *CPU-time speedup*: "
        f"this process's CPU seconds. *Loop speedup*: training tokens/s inside the loop (from the "
        f"records, after the first step; no build, no evaluation). *Rel. diff*: each member's last train "
        f"loss against its standalone run (batched and plain matmuls round differently; a loss spike at "
        f"the larger LRs amplifies that, as any change of kernel would).",
        "",
        "| model | params | sequential (s) | vectorized (s) | speedup | seq tokens/s | vec tokens/s "
        "| CPU-time speedup | loop speedup | rel. diff final loss: median / max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['size']} | {r['params'] / 1e6:.2f}M | {r['sequential_s']:.1f} | {r['vectorized_s']:.1f} | "
            f"{r['speedup']:.2f}x | {r['sequential_tokens_per_s']:.0f} | {r['vectorized_tokens_per_s']:.0f} | "
            f"{r['cpu_time_speedup']:.2f}x | {r['loop_speedup']:.2f}x | "
            f"{r['median_rel_diff_final_train_loss']:.1e} / {r['max_rel_diff_final_train_loss']:.1e} |"
        )
    lines += [
        "",
        f"Machine: {m.get('gpu') or m.get('cpu')}, torch {m['torch']}, {m['threads']} threads, "
        f"python {m['python']}. Load average before/after: {report['load_before']} / {report['load_after']}.",
    ]
    if report.get("notes"):
        lines += ["", report["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1m", "5m", "20m"])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--notes", default="", help="free text stored with the results")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": machine(device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "notes", "tag")},
        "load_before": load_average(),
        "notes": args.notes,
        "rows": [],
    }
    for size in args.sizes:
        row = measure(size, args, device)
        report["rows"].append(row)
        print(
            f"{size}: sequential {row['sequential_s']:.1f}s, vectorized {row['vectorized_s']:.1f}s, "
            f"speedup {row['speedup']:.2f}x",
            flush=True,
        )
    report["load_after"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"ensemble-{device.type}-{report['date']}{'-' + args.tag if args.tag else ''}"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out / f"{stem}.md", to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
