"""The figure this finding is about (protocol 2): gradient RMS against width, and what eps costs.

    python experiments/adam_epsilon/figure.py runs/adam_epsilon/<date> --out experiments/adam_epsilon/results/protocol2

Left: the gradient RMS of the first MLP layer (end-of-training average, as ``verdict.py`` takes
it) against d_model on log-log axes, one curve per eps with the spread over seeds, the power-law
fit to eps 1e-15 extended to where it meets the eps values (drawn as horizontal lines), as
Wortsman et al. extrapolate. Right: the update shrink 1 - update(eps) / update(1e-15) and the
loss penalty loss(eps) - loss(1e-15) against d_model. Writes ``figures/grad_rms_vs_width.png``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from proxy.records import save_figure
from proxy.verdict import figure_inputs

HERE = Path(__file__).resolve().parent


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args, verdict, runs = figure_inputs(__doc__, HERE, argv)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cells = verdict.Cells(runs)
    if not cells.grad:
        print(
            f"error: no run under {', '.join(args.paths)} logged {verdict.GRAD} with model.d_model and optim.eps",
            file=sys.stderr,
        )
        return 2
    widths = cells.widths
    eps_values = sorted({e for _, e, _ in cells.grad})
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_grad, ax_cost = fig.subplots(1, 2)
    ax_loss = ax_cost.twinx()
    for i, eps in enumerate(eps_values):
        points = [(w, [g for (w2, e, _), g in cells.grad.items() if w2 == w and e == eps]) for w in widths]
        points = [(w, _mean_sd(v)) for w, v in points if v]
        ax_grad.errorbar(
            [w for w, _ in points],
            [m for _, (m, _) in points],
            yerr=[sd for _, (_, sd) in points],
            marker="o",
            capsize=3,
            color=f"C{i}",
            label=f"eps={eps:g}",
        )
        if eps == verdict.SMALL:
            continue
        seeds = cells.seeds(verdict.SMALL, eps)
        shrink = [
            _mean_sd(
                [
                    verdict._shrink(cells.update, w, s, eps)
                    for s in seeds
                    if (w, eps, s) in cells.update and (w, verdict.SMALL, s) in cells.update
                ]
                or [np.nan]
            )
            for w in widths
        ]
        penalty = [_mean_sd([verdict._penalty(cells.loss, w, s, eps) for s in seeds] or [np.nan]) for w in widths]
        ax_cost.errorbar(
            widths,
            [m for m, _ in shrink],
            yerr=[sd for _, sd in shrink],
            marker="o",
            capsize=3,
            color=f"C{i}",
            label=f"update shrink, eps={eps:g}",
        )
        ax_loss.errorbar(
            widths,
            [m for m, _ in penalty],
            yerr=[sd for _, sd in penalty],
            marker="s",
            capsize=3,
            color=f"C{i}",
            ls="--",
            label=f"loss penalty, eps={eps:g}",
        )
    seeds = cells.seeds(verdict.SMALL)
    if len(widths) >= 2 and seeds:
        means = [statistics.fmean(cells.grad[(w, verdict.SMALL, s)] for s in seeds) for w in widths]
        slope, intercept = np.polyfit(np.log(widths), np.log(means), 1)
        if slope < 0:  # extend the fit toward the lowest eps line drawn (at most 64x the widest model)
            level = min((e for e in eps_values if e >= 1e-9), default=1e-8)
            reach = min(verdict._crossing(widths, means, level) or widths[-1], 64 * widths[-1])
            xs = np.geomspace(widths[0], max(reach, widths[-1]), 50)
            ax_grad.plot(xs, np.exp(intercept) * xs**slope, color="grey", lw=1, label=f"fit: RMS ∝ d^{slope:.2f}")
    for eps in (e for e in eps_values if e >= 1e-9):
        ax_grad.axhline(eps, color="grey", ls=":", lw=1)
    ax_grad.set(
        xscale="log",
        yscale="log",
        xlabel="width (d_model)",
        ylabel="gradient RMS (end of training)",
        title=f"{verdict.LAYER}: gradient RMS",
    )
    ax_grad.legend(fontsize=7)
    ax_cost.set(
        xscale="log",
        xlabel="width (d_model)",
        ylabel="update shrink (solid)",
        title="what a large eps costs, per width",
    )
    ax_loss.set_ylabel("loss penalty, nats (dashed)")
    ax_cost.axhline(0.0, color="grey", lw=0.8)
    handles = ax_cost.get_legend_handles_labels()
    more = ax_loss.get_legend_handles_labels()
    ax_cost.legend(handles[0] + more[0], handles[1] + more[1], fontsize=7)
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    path = args.out / "figures" / "grad_rms_vs_width.png"
    save_figure(fig, path, dpi=100)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
