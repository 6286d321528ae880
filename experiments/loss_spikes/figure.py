"""The figure this study is about: loss spikes of a near-zero loss and the RMS_t that comes before them.

    python experiments/loss_spikes/figure.py runs/loss_spikes/<date> [--out experiments/loss_spikes/results]

One column per arm (verdict.ARMS), seed 0 of each (``--seed`` for another): top, the probe loss
(log scale) with each excursion proxy/spikes.py finds marked (circle: a spike that came back,
cross: a collapse); bottom, the largest per-tensor RMS_t of each step (Wortsman et al. 2023b's
predictor), the line at 1 where Adam's second moment has fallen behind the gradient. Writes
``figures/loss_spikes.png`` under ``--out``. ``--verdict DIR``: the arms of another study run on
this organism (experiments/spike_remedies/clipping/protocol2).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from matplotlib.figure import Figure

from proxy.records import ADAM_RMS_MAX, PROBE_LOSS, output_dir, save_figure
from proxy.verdict import figure_inputs

HERE = Path(__file__).resolve().parent


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    seed, finding = 0, HERE
    if "--seed" in argv:  # figure_inputs parses the common arguments; the seed is this figure's own
        at = argv.index("--seed")
        seed = int(argv[at + 1])
        del argv[at : at + 2]
    if "--verdict" in argv:  # another study's arms on this organism (it names ARMS, arm_of, excursions)
        at = argv.index("--verdict")
        finding = Path(argv[at + 1])
        del argv[at : at + 2]
    try:
        args, verdict, runs = figure_inputs(__doc__, finding, argv)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    chosen = {verdict.arm_of(r): r for r in runs if r.error is None and r.config_value("train.seed") == seed}
    arms = [a for a in verdict.ARMS if a in chosen]
    if not arms:
        print(f"error: no run of seed {seed} of any arm under {', '.join(args.paths)}", file=sys.stderr)
        return 2
    fig = Figure(figsize=(3.2 * len(arms), 5.2), layout="constrained")
    axes = fig.subplots(2, len(arms), sharex=True, squeeze=False)
    for col, arm in enumerate(arms):
        run = chosen[arm]
        top, bottom = axes[0][col], axes[1][col]
        steps, probe = run.series(PROBE_LOSS)
        top.plot(steps, probe, linewidth=0.7, color="tab:blue")
        for e in verdict.excursions(run):
            top.plot(e.peak_step, e.peak, "o" if e.kind == "spike" else "x", color="tab:red", markersize=5)
        top.set_yscale("log")
        top.set_title(f"{arm} (seed {seed})", fontsize=9)
        top.grid(alpha=0.3)
        rms_steps, rms = run.series(ADAM_RMS_MAX)
        bottom.plot(rms_steps, rms, linewidth=0.6, color="tab:green")
        bottom.axhline(1.0, color="black", linewidth=0.8)
        bottom.set_yscale("log")
        bottom.set_xlabel("step")
        bottom.grid(alpha=0.3)
    axes[0][0].set_ylabel("probe loss (nats; o spike, x collapse)")
    axes[1][0].set_ylabel("max RMS_t over tensors")
    out = output_dir(args.out, "figures", what="the figures")
    save_figure(fig, out / "loss_spikes.png", dpi=110)
    print(f"wrote {out / 'loss_spikes.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
