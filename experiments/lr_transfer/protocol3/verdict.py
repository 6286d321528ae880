"""Verdict, protocol 3: protocol 2's criteria (experiments/lr_transfer/verdict.py, unchanged) on five
fresh seeds, and one more criterion whose bound is set by the seed noise protocol 2 measured
(issue 31, item 2; experiments/lr_transfer/README.md "Protocol 3").

Protocol 2 passed "muParam keeps the optimal LR" at |shift| mean + 2 SE = 0.246 against a bound of
0.25 decades (half a grid step, a bound chosen from the grid, not from the noise), on 3 seeds: a
fourth seed could flip it. Its shift was +0.19 +- 0.05 decades (sd over seeds), every seed positive.
Protocol 3 reruns the same sweep on seeds 3-7 (none of them seen) and judges:

1-4. protocol 2's four criteria as they are (grid brackets every optimum; muP |shift| mean + 2 SE
     < 0.25 decades; the standard parameterization's optimum moves more; muP's LR sensitivity flat);
5.   muP's optimum stays within the seed noise: |shift| mean + 2 SE < NOISE_BOUND = 2 x 0.05 =
     0.10 decades, 0.05 being the sd over seeds of protocol 2's muP shift (the spread of one
     seed's measurement of the shift): a shift that large is what one seed's noise alone makes.

Reported: each seed's shift, how many are positive, and the shift's 95 % t interval, so that "it
moves, however little" is visible beside the pass or failure of either bound.
"""

from __future__ import annotations

import math
from pathlib import Path

from proxy.analysis import seed_curves, spread
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, check_seeds_in_every_curve, curve_points, load_module

P2 = load_module(Path(__file__).resolve().parents[1])  # protocol 2: the criteria, unchanged
SEEDS = (3, 4, 5, 6, 7)
P2_SHIFT_SD = 0.05  # decades: sd over seeds of muP's shift in protocol 2 (results/verdict.md)
NOISE_BOUND = 2 * P2_SHIFT_SD


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = P2.judge(report, runs)
    v.finding = "lr_transfer (protocol 3: protocol 2's criteria on 5 fresh seeds, and a bound from the seed noise)"
    curves = seed_curves(curve_points(runs, P2._arm))
    check_seeds_in_every_curve(v, curves, SEEDS, "(parameterization, width) curve")
    widths = sorted({w for a, w in curves if a == "mup"})
    if len(widths) < 2:
        return v
    mup = P2.shift(curves, "mup", widths[0], widths[-1])
    moved = spread(abs(x) for x in mup.values)
    upper = moved.mean + 2 * moved.sem
    v.check(
        f"muP: the optimal LR stays within the seed noise from d={widths[0]} to d={widths[-1]} "
        f"(|shift| mean + 2 SE < {NOISE_BOUND:.2f} decades = 2 x protocol 2's sd of the shift over seeds)",
        moved.n >= 3 and math.isfinite(upper) and upper < NOISE_BOUND,
        f"|shift| mean + 2 SE = {upper:.3f}",
    )
    v.numbers["muP shift per seed (decades)"] = [round(x, 3) for x in mup.values]
    v.numbers["muP shift, seeds positive"] = f"{sum(x > 0 for x in mup.values)} of {len(mup.values)}"
    v.numbers["muP shift"] = mup.describe("+.3f")
    return v
