"""Verdict, protocol 1 (superseded by ../verdict.py, kept runnable): the gradient RMS falls
toward AdamW's epsilon at large LR (Wortsman et al. 2023 §3.4).

Measured on the first MLP layer (``grad_rms/blocks.0.mlp.fc_in.weight``, before clipping) and
its update (``update_rms/...``: the update RMS divided by the LR, i.e. the size of
m / (sqrt(v) + eps): about 0.23 when gradient noise dominates, sqrt((1 - beta1) / (1 + beta1)),
and up to 1 for a gradient steady across steps), each averaged over the last quarter of the
logged steps (the paper averages the last 500 steps). Runs are grouped by ``optim.eps``; models
(``model.name``) are judged separately when a ladder is swept. Criteria, all required:

1. the gradient RMS falls as the LR grows: at eps 1e-8 (the default), gradient RMS at the largest
   LR < at the smallest LR, for every model size;
2. epsilon matters where the gradient RMS is small: at the largest LR, for every model size, the
   update RMS with eps 1e-6 is below 0.9 x the update RMS with eps 1e-15 (the update shrinks
   because eps is no longer negligible beside sqrt(v)).

The paper's headline (4.8B at LR 0.3: eps 1e-6 diverges, 1e-15 helps) needs gradient RMS near 1e-8;
``numbers`` holds grad_rms / eps per run so the distance to that regime is visible.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Optional

from proxy.records import GRAD_RMS, UPDATE_RMS, Run
from proxy.report import ReportResult
from proxy.verdict import Verdict

LAYER = "blocks.0.mlp.fc_in.weight"
GRAD = GRAD_RMS + LAYER
UPDATE = UPDATE_RMS + LAYER
TAIL_FRACTION = 0.25
SHRINK = 0.9


def config_value(run: Run, dotted: str) -> Any:
    return run.config_value(dotted)


def tail_mean(run: Run, key: str) -> Optional[float]:
    _, values = run.series(key)
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None
    tail = values[-max(1, int(len(values) * TAIL_FRACTION)) :]
    return statistics.fmean(tail)


def _mean(values: list[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    verdict = Verdict(
        finding="adam_epsilon",
        source="Wortsman et al. 2023 (arXiv 2309.14322) §3.4: gradient RMS falls toward AdamW eps; the update shrinks",
    )
    # (model, eps, lr) -> grad / update RMS, seeds averaged
    grad: dict[tuple[str, float, float], list[float]] = defaultdict(list)
    update: dict[tuple[str, float, float], list[float]] = defaultdict(list)
    for run in runs:
        eps, lr = config_value(run, "optim.eps"), config_value(run, "optim.lr")
        if eps is None or lr is None:
            continue
        key = (str(config_value(run, "model.name")), float(eps), float(lr))
        if (g := tail_mean(run, GRAD)) is not None:
            grad[key].append(g)
        if (u := tail_mean(run, UPDATE)) is not None:
            update[key].append(u)
    if not grad:
        verdict.check(f"runs logged {GRAD}", False, "no run has the metric")
        return verdict

    for key in sorted(grad):
        model, eps, lr = key
        g = _mean(grad[key])
        verdict.numbers[f"grad_rms/{model}/eps={eps:g}/lr={lr:g}"] = g
        verdict.numbers[f"grad_rms_over_eps/{model}/eps={eps:g}/lr={lr:g}"] = g / eps
        if update.get(key):
            verdict.numbers[f"update_rms/{model}/eps={eps:g}/lr={lr:g}"] = _mean(update[key])

    for model in sorted({k[0] for k in grad}):
        lrs = sorted({k[2] for k in grad if k[0] == model and k[1] == 1e-8})
        if len(lrs) < 2:
            verdict.check(f"{model}: eps 1e-8 runs at two LRs or more", False, f"LRs: {lrs}")
        else:
            low, high = _mean(grad[(model, 1e-8, lrs[0])]), _mean(grad[(model, 1e-8, lrs[-1])])
            verdict.check(
                f"{model}: gradient RMS of {LAYER} falls as the LR grows (eps 1e-8)",
                high < low,
                f"{high:.3g} at LR {lrs[-1]:g} vs {low:.3g} at LR {lrs[0]:g}",
            )

        top = max((k[2] for k in update if k[0] == model and k[1] in (1e-6, 1e-15)), default=None)
        big, tiny = update.get((model, 1e-6, top)), update.get((model, 1e-15, top))
        if not big or not tiny:
            verdict.check(f"{model}: eps 1e-6 and 1e-15 runs at the largest LR", False, "missing runs")
            continue
        ratio = _mean(big) / _mean(tiny)
        verdict.numbers[f"update_ratio_eps1e-6_vs_1e-15/{model}/lr={top:g}"] = ratio
        verdict.check(
            f"{model}: at LR {top:g} eps 1e-6 shrinks the update (update RMS < {SHRINK} x eps 1e-15's)",
            ratio < SHRINK,
            f"ratio {ratio:.3g} (grad RMS {_mean(grad.get((model, 1e-6, top), [])) or float('nan'):.3g})",
        )
    return verdict
