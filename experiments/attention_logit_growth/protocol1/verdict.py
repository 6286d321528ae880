"""Verdict: attention-logit growth without QK-norm (Wortsman et al. 2023, Sec. 3.1.1).

Criteria (all must hold), on an LR sweep of QK-norm off vs on:

1. Without QK-norm the peak max attention logit grows by >= 2 orders of magnitude (x100) from
   the lowest to the highest LR of the sweep.
2. Without QK-norm the highest LR diverges or degrades: it blew up, or its final loss is at
   least 0.3 nats above the best loss of the QK-norm-off curve.
3. With QK-norm the peak max attention logit at the highest LR is at least 100x smaller than
   without it (the growth is prevented, not merely slowed).
4. LR sensitivity (Wortsman et al.) is lower with QK-norm than without.
"""

from __future__ import annotations

import math
from typing import Optional

from proxy.analysis import split_overrides
from proxy.records import Run
from proxy.report import ReportResult, RunRow
from proxy.verdict import Verdict

OFF, ON = "model.qk_norm=off", "model.qk_norm=layernorm"
GROWTH_FACTOR = 100.0
DEGRADE_NATS = 0.3


def _curve(report: ReportResult, override: str) -> list[RunRow]:
    rows = [r for r in report.runs if override in split_overrides(r.overrides) and r.lr is not None]
    if not rows:
        raise ValueError(f"no runs with {override} in the sweep")
    return sorted(rows, key=lambda r: r.lr)


def _peak(row: RunRow) -> float:
    return row.max_attn_logit_peak if row.max_attn_logit_peak is not None else math.nan


def _num(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _blown_up(row: RunRow) -> bool:
    return row.status in ("diverged", "failed") or row.final_loss is None


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="Attention logit growth", source="Wortsman et al. 2023, Sec. 3.1.1 (Fig. 1, 4)")
    off, on = _curve(report, OFF), _curve(report, ON)
    low, high, on_high = off[0], off[-1], on[-1]

    growth = _peak(high) / _peak(low)
    v.check(
        f"no QK-norm: peak max attention logit grows >= {GROWTH_FACTOR:g}x from LR {low.lr:g} to {high.lr:g}",
        growth >= GROWTH_FACTOR,
        f"{_peak(low):.3g} -> {_peak(high):.3g} (x{growth:.3g})",
    )

    best_off = report.sensitivity_of(OFF).best_loss
    gap: Optional[float] = None if _blown_up(high) or best_off is None else high.final_loss - best_off
    v.check(
        f"no QK-norm: LR {high.lr:g} diverges or ends >= {DEGRADE_NATS} nats above the best LR",
        gap is None or gap >= DEGRADE_NATS,
        f"{high.status}" if gap is None else f"final {high.final_loss:.3f} vs best {best_off:.3f} (+{gap:.3f})",
    )

    ratio = _peak(high) / _peak(on_high)
    v.check(
        f"QK-norm: peak max attention logit at LR {on_high.lr:g} >= {GROWTH_FACTOR:g}x smaller",
        ratio >= GROWTH_FACTOR,
        f"{_peak(on_high):.3g} with vs {_peak(high):.3g} without (x{ratio:.3g})",
    )

    s_off, s_on = report.sensitivity_of(OFF).sensitivity, report.sensitivity_of(ON).sensitivity
    v.check(
        "LR sensitivity lower with QK-norm",
        s_off is not None and s_on is not None and s_on < s_off,
        f"{_num(s_on)} with vs {_num(s_off)} without",
    )

    v.numbers.update(
        {
            "peak_attn_logit_off": {f"{r.lr:g}": _peak(r) for r in off},
            "peak_attn_logit_on": {f"{r.lr:g}": _peak(r) for r in on},
            "final_loss_off": {f"{r.lr:g}": r.final_loss for r in off},
            "final_loss_on": {f"{r.lr:g}": r.final_loss for r in on},
            "lr_sensitivity_off": s_off,
            "lr_sensitivity_on": s_on,
        }
    )
    return v
