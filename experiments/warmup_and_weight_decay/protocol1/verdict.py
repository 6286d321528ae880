"""Verdict, protocol 1 (superseded by ../verdict.py, kept runnable): longer warmup and
independent weight decay lower LR sensitivity (Wortsman et al. 2023, Sec. 3.2).

The sweep is a 2x2 grid, warmup length (schedule.warmup_steps) x weight-decay form (+wd=coupled:
AdamW lambda 0.1, +wd=independent: lambda 1e-4), each over an LR grid. Criteria (all must hold):

1. With either decay form, the longer warmup gives the lower LR sensitivity.
2. With either warmup, independent decay gives the lower LR sensitivity than coupled decay.
"""

from __future__ import annotations

import math

from proxy.analysis import split_overrides
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict


def _grid(report: ReportResult) -> dict[tuple[str, int], float]:
    """(decay form, warmup steps) -> LR sensitivity (NaN when not computable)."""
    grid = {}
    for row in report.sensitivity:
        items = dict(item.lstrip("+").split("=", 1) for item in split_overrides(row.overrides) if "=" in item)
        if "wd" in items and "schedule.warmup_steps" in items:
            key = (items["wd"], int(items["schedule.warmup_steps"]))
            grid[key] = math.nan if row.sensitivity is None else float(row.sensitivity)
    forms = {form for form, _ in grid}
    if forms != {"coupled", "independent"} or len({w for _, w in grid}) < 2:
        raise ValueError(f"need +wd=coupled,independent x >= 2 warmup lengths, found {sorted(grid)}")
    return grid


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="Warmup and independent weight decay", source="Wortsman et al. 2023, Sec. 3.2 (Fig. 5, 6)")
    grid = _grid(report)
    warmups = sorted({w for _, w in grid})
    short, long = warmups[0], warmups[-1]
    for form in ("coupled", "independent"):
        s_short, s_long = grid.get((form, short), math.nan), grid.get((form, long), math.nan)
        v.check(
            f"{form} decay: warmup {long} less LR-sensitive than warmup {short}",
            s_long < s_short,
            f"{s_long:.3f} vs {s_short:.3f}",
        )
    for warmup in (short, long):
        s_c, s_i = grid.get(("coupled", warmup), math.nan), grid.get(("independent", warmup), math.nan)
        v.check(
            f"warmup {warmup}: independent decay less LR-sensitive than coupled", s_i < s_c, f"{s_i:.3f} vs {s_c:.3f}"
        )
    v.numbers.update({f"lr_sensitivity/{form}/warmup_{w}": s for (form, w), s in sorted(grid.items())})
    return v
