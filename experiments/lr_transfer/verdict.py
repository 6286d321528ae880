"""Verdict: muParam keeps the optimal LR in place across width (Wortsman et al. 2023, Sec. 3.3:
"μParam (simple)" scales each linear layer's LR by base_fan_in / fan_in; the optimal LR then
stays fixed as width grows, while under the standard parameterization it falls).

The sweep (conf/experiment/lr_transfer/lab.yaml) crosses widths with ``optim.mup`` false/true;
every (parameterization, width) job trains an LR grid x 3 seeds as one ensemble. Per seed and
curve, the **optimal LR** is the vertex of a parabola through the best grid LR and its two
neighbours in log10 LR (the grid's spacing is half a decade, so the vertex resolves the optimum
more finely than the grid); the **shift** of a parameterization is log10 optimum(widest) -
log10 optimum(narrowest), per seed. Criteria, written before the run (effects per seed,
:meth:`proxy.analysis.Spread.clears`):

1. The grid brackets every curve's optimum (best LR strictly inside).
2. With muParam the optimal LR stays put: |shift| has mean + 2 SE below 0.25 decades (half a
   grid step) over the seeds.
3. Without it the optimum moves more: |shift(standard)| - |shift(muP)| > 0, clearing the spread.
4. With muParam LR sensitivity stays flat across width: its growth from the narrowest to the
   widest model has mean + 2 SE below 0.1 nats (as finding 3's flatness criterion).

Reported, not judged: optimal LR per (parameterization, width) with its spread, LR sensitivity,
the best loss per width (muP should not cost loss at its base width, where both agree).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from proxy.analysis import SeedCurve, Spread, seed_curves, spread
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, check_grid_brackets, curve_points

MAX_SHIFT = 0.25  # decades
FLAT_MARGIN = 0.1  # nats
SOURCE = (
    "Wortsman et al. 2023 (arXiv 2309.14322), Sec. 3.3: with μParam (simple) the optimal LR stays put "
    "across width; LR sensitivity stays low"
)


def _arm(run: Run) -> Optional[tuple[str, int]]:
    mup, width = run.config_value("optim.mup"), run.config_value("model.d_model")
    if mup is None or width is None:
        return None
    return ("mup" if mup else "standard"), int(width)


def optimal_lr(curve: SeedCurve) -> float:
    """log10 of the optimum: the vertex of a parabola through the best grid point and its
    neighbours (in log10 LR); the best grid LR itself when it lies at an edge."""
    lrs = sorted(curve.curve)
    i = lrs.index(curve.best_lr)
    if i == 0 or i == len(lrs) - 1:
        return math.log10(curve.best_lr)
    xs = [math.log10(lr) for lr in lrs[i - 1 : i + 2]]
    ys = [curve.curve[lr] for lr in lrs[i - 1 : i + 2]]
    a, b, _ = np.polyfit(xs, ys, 2)
    return float(-b / (2 * a)) if a > 0 else math.log10(curve.best_lr)


def shift(curves: dict, arm: str, lo: int, hi: int) -> Spread:
    a, b = curves.get((arm, hi), {}), curves.get((arm, lo), {})
    return spread(optimal_lr(a[s]) - optimal_lr(b[s]) for s in sorted(set(a) & set(b)))


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="lr_transfer", source=SOURCE)
    curves = seed_curves(curve_points(runs, _arm))
    widths = sorted({w for a, w in curves if a == "mup"} & {w for a, w in curves if a == "standard"})
    if len(widths) < 2:
        v.check("the sweep is optim.mup=false,true x >= 2 widths", False, f"arms found: {sorted(curves)}")
        return v
    lo, hi = widths[0], widths[-1]
    for (arm, width), seeds in sorted(curves.items()):
        label = f"{arm}/d={width}"
        v.numbers[f"optimal_lr/{label}"] = f"10^{spread(optimal_lr(c) for c in seeds.values()).describe('.2f')}"
        v.numbers[f"lr_sensitivity/{label}"] = spread(c.sensitivity for c in seeds.values()).describe(".3f")
        v.numbers[f"best_loss/{label}"] = spread(min(c.curve.values()) for c in seeds.values()).describe(".3f")

    check_grid_brackets(v, curves, lambda arm: f"{arm[0]}/d={arm[1]}")

    mup, std = shift(curves, "mup", lo, hi), shift(curves, "standard", lo, hi)
    moved = spread(abs(x) for x in mup.values)
    upper = moved.mean + 2 * moved.sem
    v.check(
        f"muP: the optimal LR stays put from d={lo} to d={hi} (|shift| mean + 2 SE < {MAX_SHIFT} decades)",
        moved.n >= 3 and math.isfinite(upper) and upper < MAX_SHIFT,
        f"shift {mup.describe('+.2f')} decades; |shift| mean + 2 SE = {upper:.2f}",
    )
    more = spread(abs(a) - abs(b) for a, b in zip(std.values, mup.values))
    v.check(
        "standard parameterization: the optimum moves more than with muP (|shift std| - |shift muP| > 0)",
        more.clears(+1),
        f"{more.describe('.2f')} decades; standard shift {std.describe('+.2f')}",
    )
    growth = spread(
        curves[("mup", hi)][s].sensitivity - curves[("mup", lo)][s].sensitivity
        for s in sorted(set(curves[("mup", hi)]) & set(curves[("mup", lo)]))
    )
    g_upper = growth.mean + 2 * growth.sem
    v.check(
        f"muP: LR sensitivity stays flat from d={lo} to d={hi} (growth mean + 2 SE < {FLAT_MARGIN})",
        growth.n >= 3 and math.isfinite(g_upper) and g_upper < FLAT_MARGIN,
        f"{growth.describe('.3f')}; mean + 2 SE = {g_upper:.3f}",
    )
    return v
