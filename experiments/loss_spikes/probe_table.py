"""The probes' table (experiments/loss_spikes/probes.md): one row per run of an exploratory sweep,
no criteria. Per run: the loss spikes and collapses of ``probe/loss`` under the committed definition
(proxy.spikes.loss_spikes), the lowest probe loss, its mean over the last fifth of the run, the
largest rise (the probe loss minus the lowest of the ``LOOKBACK`` values before it, after step
``FROM_STEP``) with its step, the largest max-over-tensors RMS_t in the 8 steps before that rise,
and the run's largest RMS_t.

    python experiments/loss_spikes/probe_table.py runs/loss_spikes/probe3 --vary optim.beta2
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from proxy.records import ADAM_RMS_MAX, PROBE_LOSS, Run, find_runs, load_run
from proxy.spikes import loss_spikes

FROM_STEP = 200
LOOKBACK = 50
BEFORE = 8  # steps before a rise in which RMS_t is read (Wortsman et al. 2023b: 1-8)


def largest_rise(steps: np.ndarray, values: np.ndarray) -> tuple[float, Optional[int]]:
    """(rise in nats, its step): the largest value minus the lowest of the LOOKBACK before it."""
    best, at = -math.inf, None
    for i in range(len(values)):
        if steps[i] < FROM_STEP or i < LOOKBACK or not math.isfinite(values[i]):
            continue
        rise = values[i] - np.nanmin(values[i - LOOKBACK : i])
        if rise > best:
            best, at = float(rise), int(steps[i])
    return best, at


def row(run: Run, vary: Sequence[str]) -> list[str]:
    steps, values = (np.asarray(x, dtype=float) for x in run.series(PROBE_LOSS))
    rms_steps, rms = (np.asarray(x, dtype=float) for x in run.series(ADAM_RMS_MAX))
    found = loss_spikes(steps.astype(int).tolist(), values.tolist())
    rise, at = largest_rise(steps, values)
    window = (rms_steps >= (at or 0) - BEFORE) & (rms_steps < (at or 0))
    tail = values[int(len(values) * 0.8) :]
    cells = [str(run.config_value(key)) for key in vary]
    cells += [
        run.status,
        str(sum(s.kind == "spike" for s in found)),
        str(sum(s.kind == "collapse" for s in found)),
        f"{np.nanmin(values):.4g}" if values.size else "-",
        f"{np.nanmean(tail):.4g}" if tail.size else "-",
        f"{rise:.3f} @ {at}" if at is not None else "-",
        f"{np.nanmax(rms[window]):.3g}" if window.any() else "-",
        f"{np.nanmax(rms):.3g}" if rms.size else "-",
        f"{run.summary.wall_time_s:.0f}" if isinstance(run.summary.wall_time_s, (int, float)) else "-",
    ]
    return cells


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--vary", nargs="*", default=["optim.beta2"], help="config keys that tell the runs apart")
    args = ap.parse_args(argv)
    runs = [load_run(p) for p in find_runs(args.paths)]
    head = [
        *args.vary,
        "status",
        "loss spikes",
        "collapses",
        "min probe loss",
        "mean probe loss, last fifth",
        "largest rise (nats) @ step",
        f"RMS_t in the {BEFORE} steps before it",
        "max RMS_t",
        "wall s",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for run in sorted(runs, key=lambda r: [str(r.config_value(k)) for k in args.vary]):
        print("| " + " | ".join(row(run, args.vary)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
