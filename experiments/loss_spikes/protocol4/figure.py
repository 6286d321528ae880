"""Protocol 4's figure: the probe loss of every seed at each batch size, large excursions circled.

    python experiments/loss_spikes/protocol4/figure.py runs/loss_spikes/batch_<date> \
        [--out experiments/loss_spikes/results/protocol4]

One panel per batch (4, 8, 16 rows of 128 tokens), the five seeds' probe loss on a log scale (16
held-out rows in every arm), each large excursion (peak >= 0.1 nats, the committed definition)
circled at its peak. Writes ``figures/loss_spikes_by_batch.png`` under ``--out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from matplotlib.figure import Figure

from proxy.records import PROBE_LOSS, output_dir, save_figure
from proxy.verdict import figure_inputs

HERE = Path(__file__).resolve().parent


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args, verdict, runs = figure_inputs(__doc__, HERE, argv)
    except FileNotFoundError as exc:
        print(f"error: {exc}")
        return 2
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    axes = fig.subplots(1, len(verdict.ROWS), sharey=True)
    for ax, rows in zip(axes, verdict.ROWS):
        mine = sorted(
            (r for r in runs if verdict.rows_of(r) == rows and r.config_value("train.seed") in verdict.SEEDS),
            key=lambda r: r.config_value("train.seed"),
        )
        for run in mine:
            seed = run.config_value("train.seed")
            color = f"C{verdict.SEEDS.index(seed)}"  # a seed has its colour in every panel
            steps, values = run.series(PROBE_LOSS)
            ax.plot(steps, values, lw=0.7, color=color, label=f"seed {seed}")
            for e in verdict.P1.excursions(run):
                if e.peak >= verdict.LARGE:
                    ax.plot(e.peak_step, e.peak, "o", mfc="none", mec=color, ms=8)
        ax.set_yscale("log")
        ax.set_title(f"{rows} rows x 128 tokens a step")
        ax.set_xlabel("step")
        ax.axhline(verdict.LARGE, color="grey", lw=0.6, ls="--")
    axes[0].set_ylabel("probe loss (nats, 16 held-out rows)")
    axes[-1].legend(fontsize=7, loc="upper right")
    out = output_dir(args.out / "figures", what="the figures")
    save_figure(fig, out / "loss_spikes_by_batch.png")
    print(f"wrote {out / 'loss_spikes_by_batch.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
