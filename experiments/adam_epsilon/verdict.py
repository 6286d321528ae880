"""Verdict, protocol 2: AdamW's epsilon matters more the wider the model (Wortsman et al. 2023 §3.4).

The paper's mechanism: the gradient RMS of a layer (here the first MLP layer,
``grad_rms/blocks.0.mlp.fc_in.weight``, before clipping) falls as models grow; once it nears eps,
the update m / (sqrt(v) + eps) shrinks (``update_rms/...``, the update RMS divided by the LR)
and the model trains worse. The study is a width ladder at one high LR, eps 1e-15 (negligible)
vs 1e-6 (large), several seeds; runs are paired by (width, seed) across eps: same init, same
data. Per run, the gradient and update RMS are averaged over the last quarter of the logged steps
(the paper averages its last 500 steps); the loss is the final validation loss, capped at the
loss at init (a diverged run counts as the loss at init, as in Wortsman's LR sensitivity).
Criteria, written before the run, each judged per seed and required to clear its spread
(proxy.analysis.Spread.clears: every seed with the claimed sign and the mean beyond 2 standard
errors; >= 3 seeds and >= 3 widths):

1. the gradient RMS falls with width: the least-squares slope of ln(grad RMS) against ln(d_model)
   at eps 1e-15 is negative;
2. the update shrink grows with width: shrink(d) = 1 - update(eps 1e-6) / update(eps 1e-15) is
   larger at the widest model than at the narrowest, by at least 0.05 on the seed mean;
3. so does the loss penalty: penalty(d) = loss(eps 1e-6) - loss(eps 1e-15) is larger at the
   widest model than at the narrowest, by at least 0.02 nats on the seed mean (the effect must
   also be material: three seeds of noise alone clear 2 standard errors now and then).

Reported, not judged: the power-law fit of grad RMS against width (exponent and prefactor, on
the seed means) and the width at which it would reach 1e-6 and the default 1e-8, extrapolated as
the paper does; shrink and penalty per width; eps 1e-8 where it was run (GPU preset).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional

import numpy as np

from proxy.analysis import Spread, clipped_losses, spread
from proxy.records import GRAD_RMS, UPDATE_RMS, Run
from proxy.report import ReportResult
from proxy.verdict import Verdict

LAYER = "blocks.0.mlp.fc_in.weight"
GRAD = GRAD_RMS + LAYER
UPDATE = UPDATE_RMS + LAYER
TAIL_FRACTION = 0.25
SMALL, LARGE = 1e-15, 1e-6  # the two eps every width is run with
MIN_SHRINK_GROWTH = 0.05  # criterion 2: widest minus narrowest, seed mean
MIN_PENALTY_GROWTH = 0.02  # criterion 3, nats
SOURCE = (
    "Wortsman et al. 2023 (arXiv 2309.14322) §3.4: the gradient RMS falls with scale toward AdamW's eps; "
    "the update then shrinks and the loss suffers"
)


def config_value(run: Run, dotted: str) -> Any:
    return run.config_value(dotted)


def tail_mean(run: Run, key: str) -> Optional[float]:
    _, values = run.series(key)
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None
    tail = values[-max(1, int(len(values) * TAIL_FRACTION)) :]
    return statistics.fmean(tail)


def final_loss(run: Run) -> float:
    """The final val loss, capped at the loss at init; NaN when the run has no loss at init."""
    init = run.summary.loss_at_init
    if not isinstance(init, (int, float)):
        return math.nan
    return clipped_losses([run.summary.final_val_loss], init, [run.status == "diverged"])[0]


def loglog_slope(widths: list[float], values: list[float]) -> float:
    """Least-squares slope of ln(values) against ln(widths); NaN without 2 widths or a value <= 0."""
    if len(set(widths)) < 2 or any(not (v > 0) for v in values):
        return math.nan
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


class Cells:
    """(width, eps, seed) -> the run's grad RMS, update RMS and capped final loss."""

    def __init__(self, runs: list[Run]):
        self.grad: dict[tuple[int, float, int], float] = {}
        self.update: dict[tuple[int, float, int], float] = {}
        self.loss: dict[tuple[int, float, int], float] = {}
        for run in runs:
            width, eps = config_value(run, "model.d_model"), config_value(run, "optim.eps")
            if width is None or eps is None:
                continue
            key = (int(width), float(eps), int(config_value(run, "train.seed") or 0))
            if (g := tail_mean(run, GRAD)) is not None:
                self.grad[key] = g
            if (u := tail_mean(run, UPDATE)) is not None:
                self.update[key] = u
            self.loss[key] = final_loss(run)

    @property
    def widths(self) -> list[int]:
        return sorted({w for w, _, _ in self.grad})

    def seeds(self, *eps: float) -> list[int]:
        """Seeds present at every width for every one of ``eps``."""
        sets = [{s for w2, e2, s in self.grad if w2 == w and e2 == e} for w in self.widths for e in eps]
        return sorted(set.intersection(*sets)) if sets else []

    def widest_minus_narrowest(self, table: dict, fn, seeds: list[int]) -> Spread:
        """Per seed: fn(width_max) - fn(width_min), fn(width, seed) computed from ``table``."""
        lo, hi = self.widths[0], self.widths[-1]
        return spread(fn(table, hi, s) - fn(table, lo, s) for s in seeds)


def _shrink(table: dict, width: int, seed: int, eps: float = LARGE) -> float:
    return 1.0 - table[(width, eps, seed)] / table[(width, SMALL, seed)]


def _penalty(table: dict, width: int, seed: int, eps: float = LARGE) -> float:
    return table[(width, eps, seed)] - table[(width, SMALL, seed)]


def _crossing(widths: list[int], grads: list[float], level: float) -> Optional[float]:
    """The width at which the power-law fit of grad RMS reaches ``level``; None if it does not fall,
    or only past d = 1e12."""
    slope = loglog_slope([float(w) for w in widths], grads)
    if not slope < 0:
        return None
    intercept = float(np.mean(np.log(grads)) - slope * np.mean(np.log(widths)))
    log_width = (math.log(level) - intercept) / slope
    return math.exp(log_width) if log_width < math.log(1e12) else None  # beyond any model: never


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    verdict = Verdict(finding="adam_epsilon", source=SOURCE)
    cells = Cells(runs)
    widths = cells.widths
    if not cells.grad:
        verdict.check(f"runs logged {GRAD} with model.d_model and optim.eps", False, "no run has the metric")
        return verdict
    seeds = cells.seeds(SMALL, LARGE)
    verdict.numbers["widths"] = widths
    verdict.numbers["seeds_paired"] = seeds
    enough = len(widths) >= 3 and len(seeds) >= 3
    span = f"d_model {widths[0]}-{widths[-1]}, {len(seeds)} seeds"

    for (w, e, s), g in sorted(cells.grad.items()):
        verdict.numbers[f"grad_rms/d{w}/eps={e:g}/seed{s}"] = g
    eps_seen = sorted({e for _, e, _ in cells.grad})
    for w in widths:
        for e in eps_seen:
            mine = [s for s in seeds if (w, e, s) in cells.grad]
            if mine:
                verdict.numbers[f"grad_rms/d{w}/eps={e:g}"] = spread(cells.grad[(w, e, s)] for s in mine).describe()
        for e in (x for x in eps_seen if x != SMALL):
            paired = [s for s in seeds if (w, e, s) in cells.update and (w, SMALL, s) in cells.update]
            if paired:
                verdict.numbers[f"update_shrink/d{w}/eps={e:g}"] = spread(
                    _shrink(cells.update, w, s, e) for s in paired
                ).describe()
                verdict.numbers[f"loss_penalty/d{w}/eps={e:g}"] = spread(
                    _penalty(cells.loss, w, s, e) for s in paired
                ).describe()

    # 1. grad RMS against width, per seed
    per_seed = spread(
        loglog_slope([float(w) for w in widths], [cells.grad[(w, SMALL, s)] for w in widths]) for s in seeds
    )
    verdict.check(
        f"gradient RMS of {LAYER} falls with width at eps 1e-15 ({span}; slope of ln RMS vs ln d < 0)",
        enough and per_seed.clears(-1),
        f"slope {per_seed.describe()}",
    )
    if seeds:
        means = [statistics.fmean(cells.grad[(w, SMALL, s)] for s in seeds) for w in widths]
        slope = loglog_slope([float(w) for w in widths], means)
        verdict.numbers["grad_rms_power_law_exponent"] = slope
        for level in (1e-6, 1e-8):
            crossing = _crossing(widths, means, level)
            verdict.numbers[f"width_where_grad_rms_reaches_{level:g}"] = (
                round(crossing) if crossing is not None else "never (the fit does not fall, or only past d = 1e12)"
            )

    # 2. update shrink, 3. loss penalty: larger at the widest model than at the narrowest
    paired_update = [s for s in seeds if all((w, e, s) in cells.update for w in widths for e in (SMALL, LARGE))]
    ends = f"d{widths[-1]} minus d{widths[0]}"
    shrink = cells.widest_minus_narrowest(cells.update, _shrink, paired_update)
    verdict.check(
        f"the update shrink from eps 1e-6 grows with width ({span}; shrink at {ends})",
        enough and shrink.clears(+1) and shrink.mean >= MIN_SHRINK_GROWTH,
        f"{shrink.describe()} (needs >= {MIN_SHRINK_GROWTH})",
    )
    penalty = cells.widest_minus_narrowest(cells.loss, _penalty, seeds)
    verdict.check(
        f"the loss penalty of eps 1e-6 grows with width ({span}; penalty at {ends})",
        enough and penalty.clears(+1) and penalty.mean >= MIN_PENALTY_GROWTH,
        f"{penalty.describe()} nats (needs >= {MIN_PENALTY_GROWTH})",
    )
    return verdict
