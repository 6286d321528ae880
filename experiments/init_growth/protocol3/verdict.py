"""Verdict, init growth protocol 3: the training half (OLMo 2, arXiv 2501.00656, Sec. 3.2; issue 31
item 3). Criteria committed before any run.

OLMo 2 reports that switching from OLMo-0424's scaled init to N(0, 0.02) lowered the grad-norm spike
score (the % of points at least 7 sigma from the rolling mean of the last 1000) from 0.40 to 0.03.
Protocol 2 judged the at-init half (growth exponents against width: REPRODUCED); its training half
waited for runs long enough to fill OLMo 2's window. Protocol 3 is that half alone, on a GPU lease
(``+experiment=init_growth/lease``: the 20m model, init normal vs scaled, LR {3e-3, 1e-2} x seeds
3-5, 2500 steps with the grad norm logged every step).

Design checks, decided before the claim is judged (a failure gives NOT TESTABLE AT THIS SCALE):

a. every (init, LR) cell has seeds 3, 4, 5;
b. every run logged more than 2000 grad-norm points (the 1000-point window full for more than 1000
   scored points);
c. there is something for the init to remove: at least one scaled-init run has a grad-norm spike
   score above 0 (a claim that an init lowers a spike rate cannot be judged where neither spikes).

Criterion: per seed, the spike score (7 sigma / 1000) averaged over the LRs is higher with the
scaled init than with N(0, 0.02): score(scaled) - score(normal) clears its spread over the seeds
(every seed positive, the mean beyond 2 standard errors).

Reported: each init's score per LR and seed, OLMo-core's detector (6 sigma / 128) beside it, and
each init's final validation loss (a lower spike rate bought with a worse loss is worth saying).
"""

from __future__ import annotations

import statistics
from typing import Any, Optional

from proxy.analysis import OLMO2_SPIKES, OLMO_CORE_SPIKES, spike_score, spread
from proxy.records import GRAD_NORM, Run
from proxy.report import ReportResult
from proxy.verdict import Verdict

SEEDS = (3, 4, 5)
INITS = ("normal", "scaled")
MIN_POINTS = 2000
SOURCE = (
    "OLMo 2 (arXiv 2501.00656) Sec. 3.2: N(0, 0.02) init lowers the grad-norm spike score (7 sigma over "
    "the last 1000 points) against OLMo-0424's scaled init, 0.40 -> 0.03"
)
WOULD_TEST = (
    "longer or larger runs that spike (OLMo 2 scored 7B runs over ~1e5 steps): the 124m model for 10k+ "
    "steps, about an hour of one H100"
)


def _cell(run: Run) -> Optional[tuple[str, float, int]]:
    model: Any = run.config.get("model", {})
    init = model.get("init") if isinstance(model, dict) else None
    lr, seed = run.config_value("optim.lr"), run.config_value("train.seed")
    if init not in INITS or lr is None or seed is None:
        return None
    return str(init), float(lr), int(seed)


def judge(report: Optional[ReportResult], runs: list[Run]) -> Verdict:
    v = Verdict(finding="init_growth (protocol 3: the training half, grad-norm spike score)", source=SOURCE)
    scores: dict[tuple[str, float, int], dict[str, float]] = {}
    points: dict[tuple[str, float, int], int] = {}
    losses: dict[str, list[float]] = {}
    for run in runs:
        cell = _cell(run)
        norms = run.series(GRAD_NORM)[1] if cell else []
        if cell is None or not norms:
            continue
        points[cell] = len(norms)
        scores[cell] = {
            name: spike_score(norms, options) or 0.0
            for name, options in (("olmo2", OLMO2_SPIKES), ("olmo_core", OLMO_CORE_SPIKES))
        }
        if isinstance(run.summary.final_val_loss, (int, float)):
            losses.setdefault(cell[0], []).append(float(run.summary.final_val_loss))
    lrs = sorted({lr for _, lr, _ in scores})
    missing = [f"{i}/lr={lr:g}/seed={s}" for i in INITS for lr in lrs for s in SEEDS if (i, lr, s) not in scores]
    if not v.design(
        f"every (init, LR) cell has seeds {', '.join(map(str, SEEDS))}",
        bool(lrs) and not missing,
        f"LRs {lrs}" + (f"; missing: {', '.join(missing[:6])}" if missing else ""),
        WOULD_TEST,
    ):
        return v
    shortest = min(points.values())
    if not v.design(
        f"every run logged more than {MIN_POINTS} grad-norm points (OLMo 2's 1000-point window full)",
        shortest > MIN_POINTS,
        f"shortest run: {shortest} points",
        WOULD_TEST,
    ):
        return v
    for (init, lr, seed), by_detector in sorted(scores.items()):
        v.numbers[f"spike_score/{init}/lr={lr:g}/seed={seed}"] = {k: round(x, 4) for k, x in by_detector.items()}
    for init in INITS:
        v.numbers[f"final_val_loss/{init}"] = spread(losses.get(init, [])).describe(".3f")
    scaled_spikes = max(scores[("scaled", lr, s)]["olmo2"] for lr in lrs for s in SEEDS)
    if not v.design(
        "the scaled init spikes at all (some run's 7σ/1000 grad-norm spike score above 0)",
        scaled_spikes > 0,
        f"largest scaled-init score {scaled_spikes:.3g}%",
        WOULD_TEST,
    ):
        return v
    effect = spread(
        statistics.fmean(scores[("scaled", lr, s)]["olmo2"] - scores[("normal", lr, s)]["olmo2"] for lr in lrs)
        for s in SEEDS
    )
    v.numbers["score_scaled_minus_normal, per seed"] = [round(x, 4) for x in effect.values]
    v.check(
        "the grad-norm spike score (7σ/1000, mean over LRs) is higher with the scaled init than N(0, 0.02), "
        "every seed, mean > 2 SE",
        effect.clears(+1),
        effect.describe(".3g") + " percentage points",
    )
    return v
