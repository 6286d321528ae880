"""Verdict, protocol 4: does a longer warmup lower LR sensitivity, most for larger models?
(Wortsman et al. 2023, Sec. 3.2, Fig. 5; issue 31 item 5.)

Protocols 2 and 3 measured warmup on one 99k-parameter model, where it did not lower sensitivity;
the paper's claim is about size ("most for larger models"). Protocol 4 asks it on a width ladder:
the paper's recipe (qk-layernorm, z-loss 1e-4, independent decay 1e-4: Wortsman et al.'s defaults),
d = 32 / 64 / 128 (2 layers, 4 heads, the LR-sensitivity ladder), warmup 5 vs 100 steps (1 % and
20 % of 500 steps, cosine to 0), LR {1e-3 ... 3e-1}, seeds 3-7, each (width, warmup) job one
vectorized ensemble (``+experiment=warmup_and_weight_decay/ladder_lab``).

LR sensitivity per seed from that seed's own curve (proxy.analysis.seed_curves); the warmup effect
at width d is Delta(d) = S(warmup 5) - S(warmup 100), paired by seed.

Design checks, decided before the claim is judged (a failure gives NOT TESTABLE AT THIS SCALE):

a. every (width, warmup) arm has seeds 3-7;
b. the grid brackets every curve's optimum (best LR strictly inside): sensitivities of curves whose
   optimum sits on the grid's edge are not comparable.

Criteria, written before the run:

1. a longer warmup lowers LR sensitivity at the widest model: Delta(128) clears its spread (every
   seed positive, the mean beyond 2 standard errors);
2. most for larger models: the per-seed least-squares slope of Delta(d) against log2 d clears its
   spread (> 0).

REPRODUCED when both hold. Reported beside them: Delta at every width with its 95 % t interval and
how many seeds have it positive, the slope's interval, each arm's sensitivity, best LRs and mean
loss per LR.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from proxy.analysis import SeedCurve, Spread, seed_curves, spread
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, check_grid_brackets, check_seeds_in_every_curve, curve_points

SEEDS = (3, 4, 5, 6, 7)
SOURCE = (
    "Wortsman et al. 2023 (arXiv 2309.14322), Sec. 3.2 (Fig. 5): a longer warmup lowers LR sensitivity, "
    "most for larger models"
)
WOULD_TEST = (
    "the same ladder with a grid widened on the side the optimum left, or the GPU preset "
    "(+experiment=warmup_and_weight_decay/gpu, 5m model) as the ladder's next rungs"
)


def _arm(run: Run) -> Optional[tuple[int, int]]:
    """(width, warmup steps) of a run, None when it is not part of the ladder."""
    width, warmup = run.config_value("model.d_model"), run.config_value("schedule.warmup_steps")
    return (int(width), int(warmup)) if width is not None and warmup is not None else None


def warmup_effect(curves: dict, width: int, short: int, long: int) -> Spread:
    """Delta(width) = S(short warmup) - S(long warmup) per seed present in both arms."""
    a, b = curves.get((width, short), {}), curves.get((width, long), {})
    return spread(a[s].sensitivity - b[s].sensitivity for s in sorted(set(a) & set(b)))


def width_slopes(curves: dict, widths: list[int], short: int, long: int) -> Spread:
    """Per seed: the least-squares slope of Delta(d) against log2 d over ``widths``."""
    seeds = sorted(set.intersection(*(set(curves.get((w, k), {})) for w in widths for k in (short, long))))
    x = np.log2(np.asarray(widths, dtype=float))
    slopes = []
    for s in seeds:
        deltas = [curves[(w, short)][s].sensitivity - curves[(w, long)][s].sensitivity for w in widths]
        slopes.append(round(float(np.polyfit(x, np.asarray(deltas), 1)[0]), 9))
    return spread(slopes)


def _mean_curve(seeds: dict[int, SeedCurve]) -> dict[str, float]:
    lrs = sorted({lr for c in seeds.values() for lr in c.curve})
    return {f"{lr:g}": round(float(np.mean([c.curve[lr] for c in seeds.values() if lr in c.curve])), 4) for lr in lrs}


def judge(report: Optional[ReportResult], runs: list[Run]) -> Verdict:
    v = Verdict(finding="warmup (protocol 4: the width ladder d 32/64/128, 5 seeds)", source=SOURCE)
    curves = seed_curves(curve_points(runs, _arm))
    widths = sorted({w for w, _ in curves})
    warmups = sorted({k for _, k in curves})
    if len(widths) < 2 or len(warmups) < 2:
        v.check("the sweep is >= 2 widths x >= 2 warmup lengths", False, f"arms found: {sorted(curves)}")
        return v
    short, long = warmups[0], warmups[-1]

    arm = "(width, warmup) arm"
    if not check_seeds_in_every_curve(v, curves, SEEDS, arm, WOULD_TEST):
        return v
    bracketed = check_grid_brackets(v, curves, lambda a: f"d{a[0]}/warmup {a[1]}", WOULD_TEST)

    for (w, k), per_seed in sorted(curves.items()):
        label = f"d{w}/warmup_{k}"
        v.numbers[f"lr_sensitivity/{label}"] = spread(c.sensitivity for c in per_seed.values()).describe(".3f")
        v.numbers[f"best_lr/{label}"] = sorted({f"{c.best_lr:g}" for c in per_seed.values()})
        v.numbers[f"loss_per_lr/{label}"] = _mean_curve(per_seed)
    for w in widths:
        delta = warmup_effect(curves, w, short, long)
        v.numbers[f"warmup_effect/d{w}: S(warmup {short}) - S(warmup {long})"] = delta.describe(".3f")
        v.numbers[f"warmup_effect/d{w}, per seed"] = [round(x, 4) for x in delta.values]
        v.numbers[f"warmup_effect/d{w}, seeds positive"] = f"{sum(x > 0 for x in delta.values)} of {delta.n}"
    if not bracketed:
        return v

    widest = widths[-1]
    delta = warmup_effect(curves, widest, short, long)
    v.check(
        f"at the widest model (d {widest}) warmup {long} is less LR-sensitive than warmup {short} "
        f"(S short - S long > 0, every seed, mean > 2 SE)",
        delta.clears(+1),
        delta.describe(".3f"),
    )
    slope = width_slopes(curves, widths, short, long)
    v.numbers["warmup_effect_slope_per_doubling, per seed"] = [round(x, 4) for x in slope.values]
    v.check(
        f"the warmup effect grows with width (per-seed slope of Delta against log2 d over d {widths} > 0)",
        slope.clears(+1),
        slope.describe(".3f") + " nats per doubling",
    )
    return v
