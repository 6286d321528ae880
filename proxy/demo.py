"""``proxy-demo``: the default study, end to end, in a few minutes on a laptop CPU.

Runs the ``demo`` multirun (conf/experiment/demo.yaml: the tiny model, an LR sweep with QK-norm
off vs on) as ``proxy-train -m +experiment=demo`` in a child process, then builds the report on
its sweep directory and prints where report.html is, with the report's headline (the same
block report.html and report.md open with).

    proxy-demo                                  # runs/demo/<date_time>/report/report.html
    proxy-demo --out runs/my_demo               # choose the sweep directory
    proxy-demo train.steps=100 optim.lr=1e-2,1e-1   # extra Hydra overrides go to proxy-train

The child process keeps Hydra's global state out of this one, and is exactly the command a user
would type, so the demo exercises the real entry point. The 8 runs go to as many single-threaded
worker processes as there are cores (at most 8: ``hydra/launcher=local``, ``OMP_NUM_THREADS=1``),
as the studies in experiments/ run: the tiny model gains little from a second thread, so two
1-thread runs side by side finish sooner than two 2-thread runs one after another. ``--workers 1``
runs them one after another with torch's default threads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from proxy.report import ReportError, ReportResult, build_report

DEMO_RUNS = 8  # conf/experiment/demo.yaml: QK-norm off/on x 4 LRs


def default_workers() -> int:
    """One worker per usable core, at most one per run."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(DEMO_RUNS, cores))


def demo_command(sweep_dir: Path, overrides: Sequence[str] = (), workers: int = 1) -> list[str]:
    """The multirun the demo launches (the same as ``proxy-train -m +experiment=demo ...``, with
    ``hydra/launcher=local hydra.launcher.n_jobs=N`` for N > 1 workers)."""
    launcher = ["hydra/launcher=local", f"hydra.launcher.n_jobs={workers}"] if workers > 1 else []
    return [
        sys.executable,
        "-m",
        "proxy.train",
        "-m",
        "+experiment=demo",
        f"hydra.sweep.dir={sweep_dir}",
        *launcher,
        *overrides,
    ]


def demo_env(workers: int, environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The child's environment: one torch thread per worker when several run side by side (as many
    threads as workers would contend for the same cores), unless the user set OMP_NUM_THREADS."""
    env = dict(os.environ if environ is None else environ)
    if workers > 1:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def headline(result: ReportResult) -> list[str]:
    """The report's headline (proxy/report/headline.py) as console lines: the block report.html
    and report.md open with."""
    return result.headline.text() if result.headline is not None else []


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="proxy-demo",
        description="Run the demo LR sweep (QK-norm off vs on, tiny model) and build its report.",
    )
    parser.add_argument("--out", metavar="DIR", help="sweep directory (default: runs/demo/<date_time>)")
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        metavar="N",
        help="runs trained side by side, one thread each (default: one per core, at most 8; 1: one after another)",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for proxy-train (key=value)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        print(f"proxy-demo: error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    for item in args.overrides:
        if "=" not in item:
            print(f"proxy-demo: error: not a key=value override: {item!r}", file=sys.stderr)
            return 2

    sweep_dir = Path(args.out or Path("runs") / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    print(
        f"proxy-demo: training the sweep into {sweep_dir} ({args.workers} worker{'s' if args.workers > 1 else ''}) ...",
        flush=True,
    )
    started = time.time()
    proc = subprocess.run(demo_command(sweep_dir, args.overrides, args.workers), env=demo_env(args.workers))
    if proc.returncode != 0:
        print(
            f"proxy-demo: error: the sweep exited with code {proc.returncode}; see the output above",
            file=sys.stderr,
        )
        return proc.returncode
    try:
        result = build_report([sweep_dir], sweep_dir / "report", title="proxy demo: QK-norm vs the learning rate")
    except ReportError as exc:
        print(f"proxy-demo: error: {exc}", file=sys.stderr)
        return 2
    print(f"proxy-demo: {len(result.runs)} runs in {time.time() - started:.0f} s")
    print("\n".join(headline(result)))
    print(f"report: {result.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
