"""Verdict, extrapolation protocol 2: the next size's instability predicted from the smaller ones,
judged against bounds set by the seed noise (Wortsman et al. 2023, Sec. 3.1; issue 31 item 2).

Protocol 1 put 11 of 11 decisive calls on the right side of 1e4 but failed bounds (a factor of 2,
0.05 nats) tighter than the noise of what it measured (the LR sensitivity's seed sd at d=256 was
0.075). Protocol 2 changes the bounds, not the claim or the ladder: ``bounds.json`` (bounds.py,
committed before this run) holds, per quantity, the prediction from the committed ladder (widths
32/64/128, seeds 0-2: the mean over seeds of each seed's line in ln N at d=256) and the bound
2 x sqrt(se_pred^2 + sd_256^2 / 5), sd_256 the seed sd protocol 1 measured at d=256. The runs are
d=256 on five fresh seeds (3-7, ``+experiment=extrapolation/fresh_lab``).

Design checks (a failure gives NOT TESTABLE AT THIS SCALE): the runs are d=256 with seeds 3-7 in
both recipes at every LR; every (recipe, seed) LR curve has its optimum strictly inside the grid
(the ladder's sensitivities were all bracketed; an edge optimum is another quantity).

Criteria, written before the run:

1. peak max attention logit without interventions at LR 0.03 / 0.1 / 0.3: the mean over the fresh
   seeds of log10 of each run's peak lies within the bound of its prediction;
2. the 1e4 line: wherever a prediction is decisive (its band, prediction +- bound, excludes 1e4;
   either recipe, any LR), the fresh seeds' mean log10 peak is on the predicted side;
3. LR sensitivity of each recipe: the fresh seeds' mean lies within the bound of its prediction.

REPRODUCED when all three hold; the qualitative part (2) and the quantitative parts (1, 3) are
each stated. Reported: every cell's prediction, bound and measurement with its 95 % t interval.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from proxy.analysis import peak, seed_curves, spread
from proxy.records import ATTN_MAX_LOGIT, Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, check_grid_brackets, curve_points, load_module

HERE = Path(__file__).resolve().parent
P1 = load_module(HERE.parent)  # protocol 1: the recipes and the growth LRs
BOUNDS = HERE / "bounds.json"
LIMIT_LOG10 = 4.0  # 1e4
WOULD_TEST = "the same d=256 sweep with a grid widened on the side an optimum left (or the GPU preset's ladder)"


def fresh_log10_peaks(runs: list[Run]) -> dict[str, list[float]]:
    """'recipe/lr=..' -> log10 of each run's peak max attention logit."""
    cells: dict[str, list[float]] = {}
    for run in runs:
        recipe, lr = P1._recipe(run), run.config_value("optim.lr")
        value = peak(run.series(ATTN_MAX_LOGIT)[1])
        if recipe and lr is not None and value is not None and value > 0:
            cells.setdefault(f"{recipe}/lr={float(lr):g}", []).append(math.log10(value))
    return cells


def judge(report: Optional[ReportResult], runs: list[Run], bounds: Optional[dict] = None) -> Verdict:
    b = bounds or json.loads(BOUNDS.read_text())
    v = Verdict(finding="extrapolation (protocol 2: bounds from the seed noise, 5 fresh seeds)", source=P1.SOURCE)
    studied = [r for r in runs if P1._recipe(r)]
    widths = sorted({r.config_value("model.d_model") for r in studied})
    seeds = set(b["fresh_seeds"])
    cells: dict[tuple[str, float], set[int]] = {}
    for r in studied:
        cells.setdefault((str(P1._recipe(r)), float(r.config_value("optim.lr"))), set()).add(
            int(r.config_value("train.seed"))
        )
    missing = sorted(f"{rc}/lr={lr:g}" for (rc, lr), s in cells.items() if not seeds <= s)
    complete = widths == [b["next_d_model"]] and len(cells) >= 12 and not missing
    measured_as = f"widths {widths}, {len(cells)} (recipe, LR) cells" + (
        f"; short of seeds: {missing}" if missing else ""
    )
    if not v.design(
        f"the runs are d={b['next_d_model']} with seeds {sorted(seeds)} in both recipes at every LR",
        complete,
        measured_as,
        WOULD_TEST,
    ):
        return v
    curves = seed_curves(curve_points(studied, P1._recipe))
    if not check_grid_brackets(v, curves, str, WOULD_TEST):
        return v

    peaks = fresh_log10_peaks(studied)
    for key, e in b["logit_log10"].items():
        if key in peaks:
            m = spread(peaks[key])
            v.numbers[f"log10_max_logit/{key}"] = (
                f"predicted {e['predicted']:.3f} ± {e['bound']:.3f}, measured {m.describe('.3f')}"
            )
    growth = [f"none/lr={lr:g}" for lr in P1.GROWTH_LRS]
    offs = {k: spread(peaks.get(k, [])).mean - b["logit_log10"][k]["predicted"] for k in growth}
    v.check(
        "peak max attention logit without interventions at LR 0.03/0.1/0.3: the fresh seeds' mean log10 "
        "within its noise bound of the prediction",
        all(math.isfinite(d) and abs(d) <= b["logit_log10"][k]["bound"] for k, d in offs.items()),
        "; ".join(f"{k}: {d:+.3f} (bound ±{b['logit_log10'][k]['bound']:.3f})" for k, d in offs.items()),
    )
    decisive = {
        k: e for k, e in b["logit_log10"].items() if abs(e["predicted"] - LIMIT_LOG10) > e["bound"] and k in peaks
    }
    wrong = [k for k, e in decisive.items() if (e["predicted"] > LIMIT_LOG10) != (spread(peaks[k]).mean > LIMIT_LOG10)]
    v.check(
        "every decisive prediction (its band excludes 1e4) puts the fresh seeds' max logit on its side of 1e4",
        bool(decisive) and not wrong,
        f"{len(decisive) - len(wrong)} of {len(decisive)} right" + (f"; wrong: {', '.join(wrong)}" if wrong else ""),
    )
    within = []
    for recipe, e in b["sensitivity"].items():
        m = spread(c.sensitivity for c in curves.get(recipe, {}).values())
        within.append(m.n > 0 and abs(m.mean - e["predicted"]) <= e["bound"])
        v.numbers[f"lr_sensitivity/{recipe}"] = (
            f"predicted {e['predicted']:.3f} ± {e['bound']:.3f}, measured {m.describe('.3f')}"
        )
    v.check(
        "LR sensitivity of each recipe: the fresh seeds' mean within its noise bound of the prediction",
        bool(within) and all(within),
        "; ".join(v.numbers[f"lr_sensitivity/{r}"] for r in b["sensitivity"]),
    )
    return v
