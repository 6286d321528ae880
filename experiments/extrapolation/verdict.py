"""Verdict: predicted vs measured instability at the next size (Wortsman et al. 2023: the
instabilities of larger models can be predicted from how small-model quantities scale).

``predictions.json`` beside this file was written by predict.py from the committed size ladder
(widths 32/64/128) BEFORE the next size (d_model=256, conf/experiment/extrapolation/lab.yaml:
the ladder's protocol, one width more) was run. This verdict measures that size the same way and
compares. Criteria, written with the predictions:

1. Peak max attention logit without interventions, at the LRs where attention logits grow
   (0.03, 0.1, 0.3): the median over seeds lies within a factor of 2 of the prediction
   (|log10 measured - log10 predicted| <= 0.3) at each.
2. The 1e4 line (Wortsman et al.: runs whose max logit passed ~1e4 diverged): wherever the
   prediction is decisive (more than a factor 2 from 1e4, either recipe, any LR), the measured
   median is on the predicted side.
3. LR sensitivity of each recipe (per seed, mean over seeds) lies within 0.05 nats of its
   prediction.

Reported, not judged: every (recipe, LR) cell predicted vs measured, the sensitivity per seed.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional

from proxy.analysis import override_value, peak, seed_curves, spread
from proxy.records import ATTN_MAX_LOGIT, Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, curve_points

HERE = Path(__file__).resolve().parent
PREDICTIONS = HERE / "predictions.json"
GROWTH_LRS = (0.03, 0.1, 0.3)
FACTOR_LOG10 = 0.3  # a factor of 2
LIMIT = 1e4
SENSITIVITY_TOLERANCE = 0.05  # nats
SOURCE = (
    "Wortsman et al. 2023 (arXiv 2309.14322), Sec. 3.1: small-model scaling of the max attention logit and "
    "of LR sensitivity predicts the instability of larger models"
)


def _recipe(run: Run) -> Optional[str]:
    recipe = override_value(run.overrides, "stability")
    return recipe if recipe in ("none", "qknorm_zloss") else None


def measured_peaks(runs: list[Run]) -> dict[str, float]:
    """'recipe/lr=..' -> median over seeds of the run's peak max attention logit."""
    cells: dict[str, list[float]] = {}
    for run in runs:
        recipe, lr = _recipe(run), run.config_value("optim.lr")
        value = peak(run.series(ATTN_MAX_LOGIT)[1])
        if recipe and lr is not None and value is not None:
            cells.setdefault(f"{recipe}/lr={float(lr):g}", []).append(value)
    return {k: statistics.median(v) for k, v in cells.items()}


def judge(report: ReportResult, runs: list[Run], predictions: Optional[dict] = None) -> Verdict:
    v = Verdict(finding="extrapolation", source=SOURCE)
    pred = predictions or json.loads(PREDICTIONS.read_text())
    widths = {run.config_value("model.d_model") for run in runs if _recipe(run)}
    v.numbers["predicted_d_model"], v.numbers["measured_d_model"] = pred["next_d_model"], sorted(widths)
    if widths != {pred["next_d_model"]}:
        v.check(f"the runs are the predicted size d_model={pred['next_d_model']}", False, f"widths {sorted(widths)}")
        return v
    peaks = measured_peaks(runs)
    cells = []
    for key, p in pred["logit"].items():
        if key in peaks:
            cells.append((key, p["predicted"], peaks[key]))
            v.numbers[f"max_logit/{key}"] = f"predicted {p['predicted']:.3g}, measured {peaks[key]:.3g}"
    growth = [(k, p, m) for k, p, m in cells if k.startswith("none/") and float(k.split("=")[1]) in GROWTH_LRS]
    off = [(k, math.log10(m) - math.log10(p)) for k, p, m in growth]
    v.check(
        "peak max attention logit without interventions at LR 0.03/0.1/0.3 within a factor of 2 of the prediction",
        len(growth) == len(GROWTH_LRS) and all(abs(d) <= FACTOR_LOG10 for _, d in off),
        "; ".join(f"{k}: log10 measured - predicted {d:+.2f}" for k, d in off) or "no cells",
    )
    decisive = [(k, p, m) for k, p, m in cells if abs(math.log10(p) - math.log10(LIMIT)) > FACTOR_LOG10]
    wrong = [k for k, p, m in decisive if (p > LIMIT) != (m > LIMIT)]
    v.check(
        "every decisive prediction (> 2x from 1e4) puts the max logit on the right side of 1e4",
        bool(decisive) and not wrong,
        f"{len(decisive) - len(wrong)} of {len(decisive)} right" + (f"; wrong: {', '.join(wrong)}" if wrong else ""),
    )
    curves = seed_curves(curve_points(runs, _recipe))
    within = []
    for recipe, p in pred["sensitivity"].items():
        measured = spread(c.sensitivity for c in curves.get(recipe, {}).values())
        within.append(measured.n > 0 and abs(measured.mean - p["predicted"]) <= SENSITIVITY_TOLERANCE)
        v.numbers[f"lr_sensitivity/{recipe}"] = (
            f"predicted {p['predicted']:.3f} ± {p['sd']:.3f}, measured {measured.describe('.3f')}"
        )
    v.check(
        f"LR sensitivity of each recipe within {SENSITIVITY_TOLERANCE} nats of the prediction",
        bool(within) and all(within),
        "; ".join(f"{r}: {v.numbers[f'lr_sensitivity/{r}']}" for r in pred["sensitivity"]),
    )
    return v
