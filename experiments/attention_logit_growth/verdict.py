"""Verdict, protocol 2: attention logits grow without QK-layernorm at high LR, the runs whose logit
passes ~1e4 are the ones that fail, and QK-layernorm prevents both (Wortsman et al. 2023, Sec. 3.1.1,
Fig. 1 and 4).

The sweep is ``model.qk_norm=off,layernorm`` (x model sizes, on a GPU); every job trains an LR grid
x several seeds as one vectorized ensemble. The paper's quantity is the max attention logit
(``attn/max_logit``, the largest q.k/sqrt(d_h) of any layer at a logging step); a run's peak is its
largest finite value. Every effect is measured once per seed (paired across the two arms by seed:
same init and data) and must clear its spread (:meth:`proxy.analysis.Spread.clears`: every seed
with the claimed sign, the mean beyond 2 standard errors, >= 3 seeds). Criteria, written before
the run, each judged at every model size of the sweep:

1. The grid brackets the optimum: every (arm, seed) LR curve has its best LR strictly inside.
2. Without QK-norm the logit grows by orders of magnitude with LR: log10(largest peak over the grid)
   - log10(peak at the lowest LR) exceeds 2 (x100), clearing the spread.
3. The paper's mark: at least one run per seed passes 1e4 without QK-norm, and every run of either
   arm whose peak passed 1e4 diverged or ended >= 0.3 nats above the best LR of its own curve.
4. QK-norm prevents the growth: no run with it passes 1e4, and at the top LR the peak without it is
   > 100x the peak with it (log10 ratio - 2 clears the spread).
5. QK-norm lowers LR sensitivity (Wortsman et al.: mean over the grid of min(final, init) - best):
   S(off) - S(on) > 0, clearing the spread.

Reported, not judged: the peak per LR (median and range over seeds), the mean final loss per LR,
the best LRs, the sensitivities with their spread, and every run that passed 1e4 with its loss.
Protocol 1 (one seed, 4 LRs, criteria 2-5 on single runs) is in ``protocol1/``.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

from proxy.analysis import SeedCurve, Spread, peak, seed_curves, spread
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, check_grid_brackets, curve_points

OFF, ON = "off", "layernorm"
MAX_LOGIT = "attn/max_logit"
ORDERS = 2.0  # criteria 2 and 4: x100
MARK = 1e4  # the paper: every run whose max logit passed ~1e4 diverged
DEGRADE_NATS = 0.3
SOURCE = (
    "Wortsman et al. 2023 (arXiv 2309.14322), Sec. 3.1.1, Fig. 1 and 4: without qk-layernorm the "
    "max attention logit grows at high LR and the runs that pass ~1e4 diverge; qk-layernorm prevents it"
)

Arm = tuple[str, int]  # (qk_norm, d_model)


def _arm(run: Run) -> Optional[Arm]:
    norm, width = run.config_value("model.qk_norm"), run.config_value("model.d_model")
    norm = getattr(norm, "value", norm)
    if norm not in (OFF, ON) or width is None:
        return None
    return str(norm), int(width)


def _peaks(runs: list[Run]) -> dict[Arm, dict[int, dict[float, float]]]:
    """arm -> seed -> LR -> the run's peak max attention logit (runs without one left out)."""
    out: dict[Arm, dict[int, dict[float, float]]] = {}
    for run in runs:
        arm, lr = _arm(run), run.config_value("optim.lr")
        value = peak(run.series(MAX_LOGIT)[1])
        if arm is None or lr is None or value is None:
            continue
        seed = int(run.config_value("train.seed") or 0)
        out.setdefault(arm, {}).setdefault(seed, {})[float(lr)] = value
    return out


def _orders_above(values: list[float]) -> Spread:
    """log10 ratios minus ORDERS: the effect 'more than 100x' as a spread to clear above 0."""
    return spread(v - ORDERS for v in values)


def _failed(curve: SeedCurve, lr: float, diverged: bool) -> bool:
    return diverged or curve.curve[lr] >= min(curve.curve.values()) + DEGRADE_NATS


def _summary(values: list[float]) -> str:
    values = sorted(values)
    return f"{statistics.median(values):.3g} [{values[0]:.3g}, {values[-1]:.3g}]"


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="Attention logit growth", source=SOURCE)
    points = curve_points(runs, _arm)
    curves = seed_curves(points)
    peaks = _peaks(runs)
    diverged = {(p.group, p.seed, p.lr): p.diverged for p in points}
    widths = sorted({w for n, w in curves if n == OFF} & {w for n, w in curves if n == ON})
    if not widths:
        v.check("the sweep has model.qk_norm=off and layernorm LR curves", False, f"arms found: {sorted(curves)}")
        return v

    check_grid_brackets(v, curves, lambda arm: f"{arm[0]}/d={arm[1]}")

    for width in widths:
        off, on = (OFF, width), (ON, width)
        seeds = sorted(set(curves[off]) & set(curves[on]) & set(peaks.get(off, {})) & set(peaks.get(on, {})))
        tag = f" (d={width})" if len(widths) > 1 else ""

        growth = []
        for s in seeds:
            by_lr = peaks[off][s]
            growth.append(math.log10(max(by_lr.values()) / by_lr[min(by_lr)]))
        g = _orders_above(growth)
        v.check(
            f"no QK-norm: the peak logit grows > {10**ORDERS:g}x from the lowest LR to its largest{tag}",
            g.clears(+1),
            f"log10 growth {spread(growth).describe('.2f')}",
        )

        past = []  # (arm, seed, lr, peak, failed)
        for arm in (off, on):
            for s in seeds:
                for lr, value in sorted(peaks[arm][s].items()):
                    if value > MARK and lr in curves[arm][s].curve:
                        failed = _failed(curves[arm][s], lr, diverged.get((arm, s, lr), False))
                        past.append((arm[0], s, lr, value, failed))
        reached = {s for n, s, *_ in past if n == OFF}
        ok = bool(seeds) and reached >= set(seeds) and all(failed for *_, failed in past)
        held = [f"{n} seed {s} LR {lr:g} ({value:.2g})" for n, s, lr, value, failed in past if not failed]
        v.check(
            f"the mark: every seed passes {MARK:g} without QK-norm, and every run past it diverged or "
            f"ended >= {DEGRADE_NATS} nats above its curve's best{tag}",
            ok,
            f"{len(past)} runs past {MARK:g} in {len(reached)} of {len(seeds)} seeds; "
            + ("all failed" if not held else "still training well: " + "; ".join(held[:4])),
        )

        top = max(lr for seeds_ in curves.values() for c in seeds_.values() for lr in c.curve)
        on_past = [f"seed {s} LR {lr:g}" for n, s, lr, _, _ in past if n == ON]
        ratios = [
            math.log10(peaks[off][s][top] / peaks[on][s][top])
            for s in seeds
            if top in peaks[off][s] and top in peaks[on][s]
        ]
        r = _orders_above(ratios)
        v.check(
            f"QK-norm: no run passes {MARK:g}, and at LR {top:g} the peak is > {10**ORDERS:g}x "
            f"smaller than without{tag}",
            not on_past and r.clears(+1),
            f"log10(off / on) {spread(ratios).describe('.2f')}"
            + (f"; past {MARK:g} with QK-norm: {', '.join(on_past)}" if on_past else ""),
        )

        lower = spread(curves[off][s].sensitivity - curves[on][s].sensitivity for s in seeds)
        v.check(f"QK-norm lowers LR sensitivity: S(off) - S(on) > 0{tag}", lower.clears(+1), lower.describe(".3f"))

        for arm in (off, on):
            label = f"{arm[0]}/d={width}"
            by_lr: dict[float, list[float]] = {}
            for s in seeds:
                for lr, value in peaks[arm][s].items():
                    by_lr.setdefault(lr, []).append(value)
            v.numbers[f"peak_max_logit/{label}"] = {f"{lr:g}": _summary(vals) for lr, vals in sorted(by_lr.items())}
            losses: dict[float, list[float]] = {}
            for s in seeds:
                for lr, loss in curves[arm][s].curve.items():
                    losses.setdefault(lr, []).append(loss)
            v.numbers[f"final_loss/{label}"] = {
                f"{lr:g}": round(statistics.fmean(x), 4) for lr, x in sorted(losses.items())
            }
            v.numbers[f"best_lr/{label}"] = sorted({f"{curves[arm][s].best_lr:g}" for s in seeds})
            v.numbers[f"lr_sensitivity/{label}"] = spread(curves[arm][s].sensitivity for s in seeds).describe(".3f")
        v.numbers[f"runs_past_{MARK:g}/d={width}"] = [
            f"{n} seed {s} LR {lr:g}: {value:.3g} ({'failed' if failed else 'trained on'})"
            for n, s, lr, value, failed in past
        ]
    return v
