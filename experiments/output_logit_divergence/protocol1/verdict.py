"""Verdict: output-logit divergence without weight decay (Wortsman et al. 2023, Sec. 3.1.2).

At init the mean output logit is ~0 (log Z ~ ln V). The paper's failure: with no weight decay
and a high LR the logits drift very negative late in training, since softmax is invariant to a
shared shift and nothing pins log Z; z-loss (1e-4 log^2 Z) pins it. Criteria (all must hold), on
the highest LR of the sweep:

1. Without z-loss the final mean output logit is <= -10 (strongly negative: beyond ln V of the
   lab vocabulary) and still falling late: the final value is below the value at mid-training.
2. With z-loss the final mean output logit is at most half as negative as without it.
3. With z-loss log Z (output/lse_mean) ends within 1 nat of 0, i.e. the drift is pinned.
"""

from __future__ import annotations

import math
from typing import Optional

from proxy import records
from proxy.analysis import override_value
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict

MEAN, LSE = records.OUTPUT_LOGIT_MEAN, records.OUTPUT_LSE_MEAN
STRONGLY_NEGATIVE = -10.0


def _override(run: Run, key: str) -> Optional[str]:
    return override_value(run.overrides, key)


def _last(run: Run, key: str) -> float:
    values = [v for v in run.series(key)[1] if isinstance(v, (int, float)) and math.isfinite(v)]
    return values[-1] if values else math.nan


def _at_mid(run: Run, key: str) -> float:
    steps, values = run.series(key)
    if not steps:
        return math.nan
    mid = steps[-1] / 2
    return min(zip(steps, values), key=lambda sv: abs(sv[0] - mid))[1]


def _top_lr_run(runs: list[Run], z_loss: float) -> Run:
    chosen = [r for r in runs if float(_override(r, "loss.z_loss") or "nan") == z_loss and _override(r, "optim.lr")]
    if not chosen:
        raise ValueError(f"no runs with loss.z_loss={z_loss:g} in the sweep")
    return max(chosen, key=lambda r: float(_override(r, "optim.lr")))


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="Output logit divergence", source="Wortsman et al. 2023, Sec. 3.1.2 (Fig. 8)")
    plain, zl = _top_lr_run(runs, 0.0), _top_lr_run(runs, 1e-4)
    lr = _override(plain, "optim.lr")
    m_plain, m_mid, m_z = _last(plain, MEAN), _at_mid(plain, MEAN), _last(zl, MEAN)
    lse_z = _last(zl, LSE)

    v.check(
        f"no z-loss, LR {lr}: final mean output logit <= {STRONGLY_NEGATIVE:g} and still falling",
        m_plain <= STRONGLY_NEGATIVE and m_plain < m_mid,
        f"{m_mid:.3g} at mid-training -> {m_plain:.3g} at the end",
    )
    v.check(
        "z-loss 1e-4: final mean output logit at most half as negative",
        m_z > m_plain / 2 if m_plain < 0 else False,
        f"{m_z:.3g} with vs {m_plain:.3g} without",
    )
    v.check("z-loss 1e-4: log Z ends within 1 nat of 0", abs(lse_z) <= 1.0, f"final log Z {lse_z:.3g}")

    for run in runs:
        tag = f"z{_override(run, 'loss.z_loss')}_lr{_override(run, 'optim.lr')}"
        v.numbers[f"logit_mean_final/{tag}"] = _last(run, MEAN)
        v.numbers[f"log_z_final/{tag}"] = _last(run, LSE)
        v.numbers[f"final_loss/{tag}"] = run.summary.final_val_loss
    return v
