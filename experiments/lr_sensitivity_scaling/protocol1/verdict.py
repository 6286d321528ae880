"""Verdict, protocol 1 (superseded by ../verdict.py, kept runnable): LR sensitivity grows with
model size; QK-norm + z-loss lower it (Wortsman et al. 2023, Fig. 1).

The sweep crosses a width ladder (model.d_model) with two recipes (+stability=none vs
+stability=qknorm_zloss) and an LR grid. Criteria (all must hold):

1. Without interventions, LR sensitivity does not fall along the ladder and the largest model
   is more sensitive than the smallest.
2. With qk-layernorm + z-loss, LR sensitivity is lower than without at every size.
3. With them, sensitivity grows less from the smallest to the largest model than without.
"""

from __future__ import annotations

import math

from proxy.analysis import split_overrides
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict

BASE, FIXED = "stability=none", "stability=qknorm_zloss"


def _ladder(report: ReportResult, recipe: str) -> dict[int, float]:
    """d_model -> LR sensitivity of that recipe (NaN when not computable)."""
    ladder = {}
    for row in report.sensitivity:
        items = [item.lstrip("+") for item in split_overrides(row.overrides)]
        widths = [int(item.split("=", 1)[1]) for item in items if item.startswith("model.d_model=")]
        if recipe in items and widths:
            ladder[widths[0]] = math.nan if row.sensitivity is None else float(row.sensitivity)
    if len(ladder) < 2:
        raise ValueError(f"need >= 2 widths with +{recipe}, found {sorted(ladder)}")
    return dict(sorted(ladder.items()))


def _fmt(ladder: dict[int, float]) -> str:
    return ", ".join(f"d={d}: {s:.3f}" for d, s in ladder.items())


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="LR sensitivity scales with size", source="Wortsman et al. 2023, Sec. 3.1 (Fig. 1)")
    base, fixed = _ladder(report, BASE), _ladder(report, FIXED)
    b = list(base.values())
    v.check(
        "no interventions: LR sensitivity non-decreasing with width, largest > smallest",
        all(x <= y for x, y in zip(b, b[1:])) and b[-1] > b[0],
        _fmt(base),
    )
    shared = [d for d in base if d in fixed]
    v.check(
        "QK-norm + z-loss: lower LR sensitivity at every width",
        bool(shared) and all(fixed[d] < base[d] for d in shared),
        "; ".join(f"d={d}: {fixed[d]:.3f} vs {base[d]:.3f}" for d in shared),
    )
    lo, hi = shared[0], shared[-1]
    growth_base, growth_fixed = base[hi] - base[lo], fixed[hi] - fixed[lo]
    v.check(
        f"QK-norm + z-loss: sensitivity grows less from d={lo} to d={hi}",
        growth_fixed < growth_base,
        f"+{growth_fixed:.3f} with vs +{growth_base:.3f} without",
    )
    v.numbers.update(
        {
            "lr_sensitivity_none": {str(d): s for d, s in base.items()},
            "lr_sensitivity_qknorm_zloss": {str(d): s for d, s in fixed.items()},
        }
    )
    return v
