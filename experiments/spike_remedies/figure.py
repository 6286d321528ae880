"""The figure this study is about: how much a stretch of bad data hurts, per remedy.

    python experiments/spike_remedies/figure.py runs/spike_remedies/<date> [--out experiments/spike_remedies/results]

Left: val loss minus that of the clean run with the same seed, against the step, one line per arm
(mean over seeds, band = min..max), the injection window shaded. Right: that excess at the end of
training, per arm, one dot per seed. Uses the arms and pairing of ``verdict.py``. Writes
``figures/val_excess.png`` under ``--out``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from proxy.records import save_figure
from proxy.verdict import figure_inputs

HERE = Path(__file__).resolve().parent


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args, verdict, runs = figure_inputs(__doc__, HERE, argv)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    by_arm: dict[str, dict] = defaultdict(dict)
    for run in runs:
        if run.status == "completed" and run.series(verdict.VAL)[0]:
            by_arm[verdict.arm_of(run)][verdict.config_value(run, "train.seed")] = run
    clean = by_arm.get("clean")
    if not clean or len(by_arm) < 2:
        print(f"error: need clean runs and at least one other arm under {', '.join(args.paths)}", file=sys.stderr)
        return 2
    planted = verdict.injection_window(runs)

    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax_curve, ax_final = fig.subplots(1, 2, width_ratios=(2.2, 1))
    arms = [a for a in verdict.ARMS if a in by_arm and a != "clean"] + sorted(set(by_arm) - set(verdict.ARMS))
    colors = colormaps["tab10"]
    for i, arm in enumerate(arms):
        curves = []
        for seed, run in by_arm[arm].items():
            if seed not in clean:
                continue
            reference = dict(zip(*clean[seed].series(verdict.VAL)))
            steps, values = run.series(verdict.VAL)
            curves.append({s: v - reference[s] for s, v in zip(steps, values) if s in reference})
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        grid = np.array([[c[s] for s in steps] for c in curves])
        color = colors(i)
        ax_curve.plot(steps, grid.mean(0), color=color, linewidth=1.6, label=f"{arm} (n={len(curves)})")
        ax_curve.fill_between(steps, grid.min(0), grid.max(0), color=color, alpha=0.15, linewidth=0)
        finals = [verdict.final_excess(run, clean[seed]) for seed, run in by_arm[arm].items() if seed in clean]
        finals = [f for f in finals if f is not None]
        ax_final.scatter([i] * len(finals), finals, color=color, zorder=3)
        if finals:
            ax_final.hlines(np.mean(finals), i - 0.3, i + 0.3, color=color, linewidth=2)
    if planted:
        ax_curve.axvspan(*planted, color="gray", alpha=0.15, label="bad-data window")
    ax_curve.axhline(0.0, color="black", linewidth=0.8)
    ax_curve.set_xlabel("step")
    ax_curve.set_ylabel("val loss − clean run's (nats)")
    ax_curve.set_title("harm done by the bad data, per arm (mean over seeds, band: min-max)", fontsize=10)
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    ax_final.axhline(0.0, color="black", linewidth=0.8)
    ax_final.set_xticks(range(len(arms)), arms, rotation=30)
    ax_final.set_ylabel("final val loss − clean run's (nats)")
    ax_final.set_title("at the end of training (dots: seeds)", fontsize=10)
    ax_final.grid(alpha=0.3, axis="y")
    out = args.out / "figures"
    out.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out / "val_excess.png", dpi=120)
    print(f"wrote {out / 'val_excess.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
