"""Protocol 1's figure: gradient RMS and Adam update size against the LR, per eps.

    python experiments/adam_epsilon/protocol1/figure.py runs/adam_epsilon/<date> \
        [--out experiments/adam_epsilon/results]

The generic report plots losses and logits over steps; Wortsman et al.'s §3.4 figure is instead
the gradient RMS of one layer (averaged over the end of training) against the LR, with the eps
values drawn as horizontal lines, so one can read how far the gradient is from eps. Uses the same
tail average as ``verdict.py``. Writes ``figures/grad_rms_vs_lr.png`` under ``--out``.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

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
    # (model, eps) -> [(lr, grad RMS, update RMS)]
    curves: dict[tuple[str, float], list[tuple[float, float, float]]] = defaultdict(list)
    for run in runs:
        eps, lr = verdict.config_value(run, "optim.eps"), verdict.config_value(run, "optim.lr")
        grad, update = verdict.tail_mean(run, verdict.GRAD), verdict.tail_mean(run, verdict.UPDATE)
        if None not in (eps, lr, grad, update):
            curves[(str(verdict.config_value(run, "model.name")), float(eps))].append((float(lr), grad, update))
    if not curves:
        print(f"error: no run under {', '.join(args.paths)} logged {verdict.GRAD}", file=sys.stderr)
        return 2

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_grad, ax_update = fig.subplots(1, 2)
    for i, ((model, eps), points) in enumerate(sorted(curves.items())):
        lrs, grads, updates = zip(*sorted(points))
        label = f"{model}, eps={eps:g}"
        ax_grad.plot(lrs, grads, marker="o", color=f"C{i}", label=label)
        ax_update.plot(lrs, updates, marker="o", color=f"C{i}", label=label)
    for eps in sorted({eps for _, eps in curves if eps >= 1e-9}):
        ax_grad.axhline(eps, color="grey", ls=":", lw=1)
        ax_grad.annotate(f"eps={eps:g}", (ax_grad.get_xlim()[0], eps), fontsize=7, va="bottom", color="grey")
    ax_grad.set(
        xscale="log",
        yscale="log",
        xlabel="peak LR",
        ylabel="gradient RMS (end of training)",
        title=f"{verdict.LAYER}: gradient RMS",
    )
    ax_update.set(xscale="log", xlabel="peak LR", ylabel="update RMS / LR", title="size of m / (sqrt(v) + eps)")
    ax_grad.legend(fontsize=7)
    (args.out / "figures").mkdir(parents=True, exist_ok=True)
    path = args.out / "figures" / "grad_rms_vs_lr.png"
    save_figure(fig, path, dpi=100)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
