"""Verdict: repeated n-grams raise the grad-norm spike score; masking them lowers it (OLMo 2 §3.1).

Runs are grouped by two config switches, ``data.inject.enabled`` and ``data.ngram_filter.enabled``;
seeds (and LRs, if swept) are averaged within a group. Criteria, all required:

1. injection raises the grad-norm spike score: mean score of (inject, no filter) > (clean, no filter);
2. masking lowers it: mean score of (inject, filter) < (inject, no filter);
3. the mechanism is there: steps whose batch carries a planted run have a larger mean grad norm than
   the other steps of the same runs (ratio > 1.1) without the filter, and the filter masked tokens.

The spike score uses OLMo-core's detector (6 sigma above the mean of the previous 128 values),
because a lab run has a few hundred steps: OLMo 2's 7 sigma / 1000-step window is reported beside it
(``numbers``) but never fills its window here. A spike score is a count of rare events: with one seed
per group a difference of one or two spikes is within noise, so read the ratio in (3) beside it.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional

import numpy as np

from proxy import records
from proxy.analysis import OLMO2_SPIKES, OLMO_CORE_SPIKES, spike_score
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict

GRAD_NORM, INJECTED_ROWS, MASKED_TOKENS = records.GRAD_NORM, records.DATA_INJECTED_ROWS, records.DATA_MASKED_TOKENS
MIN_GRAD_RATIO = 1.1


def _switch(run: Run, section: str) -> bool:
    node: Any = run.config.get("data", {}).get(section, {})
    return bool(node.get("enabled", False)) if isinstance(node, dict) else False


def _group(run: Run) -> str:
    inject = "inject" if _switch(run, "inject") else "clean"
    return f"{inject}+{'filter' if _switch(run, 'ngram_filter') else 'nofilter'}"


def _mean(values: list[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def _injected_step_ratio(runs: list[Run]) -> Optional[float]:
    """Mean grad norm on steps that carried a planted run / on the other steps, pooled over runs."""
    ratios = []
    for run in runs:
        steps, norms = run.series(GRAD_NORM)
        planted = dict(zip(*run.series(INJECTED_ROWS)))
        flags = np.array([planted.get(s, 0.0) > 0 for s in steps])
        norms_arr = np.array(norms)
        ok = np.isfinite(norms_arr)
        if flags[ok].any() and (~flags[ok]).any():
            ratios.append(norms_arr[ok & flags].mean() / norms_arr[ok & ~flags].mean())
    return _mean(ratios)


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    verdict = Verdict(
        finding="repeated_ngrams",
        source="OLMo 2 (arXiv 2501.00656) §3.1: repeated n-grams cause grad-norm spikes; filtering them reduces spikes",
    )
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.series(GRAD_NORM)[1]:
            groups.setdefault(_group(run), []).append(run)

    def score(group: str, options=OLMO_CORE_SPIKES) -> Optional[float]:
        values = [spike_score(r.series(GRAD_NORM)[1], options) for r in groups.get(group, [])]
        return _mean([v for v in values if v is not None])

    for group in sorted(groups):
        verdict.numbers[f"spike_score_grad_norm/{group}"] = score(group)
        verdict.numbers[f"spike_score_grad_norm_olmo2/{group}"] = score(group, OLMO2_SPIKES)
        verdict.numbers[f"runs/{group}"] = len(groups[group])
        losses = [v for r in groups[group] if (v := r.summary.final_val_loss) is not None]
        verdict.numbers[f"final_val_loss/{group}"] = _mean(losses)

    needed = ("clean+nofilter", "inject+nofilter", "inject+filter")
    missing = [g for g in needed if g not in groups]
    if missing:
        verdict.check(
            "the sweep has clean, injected and injected+filtered runs with a grad-norm series",
            False,
            f"missing: {', '.join(missing)}",
        )
        return verdict
    clean, dirty, masked = (score(g) for g in needed)
    if clean is None or dirty is None or masked is None:
        verdict.check(
            f"runs are long enough to score spikes (> {OLMO_CORE_SPIKES.min_history} logged steps)",
            False,
            f"longest grad-norm series: {max(len(r.series(GRAD_NORM)[1]) for r in runs)} points",
        )
        return verdict

    verdict.check(
        "injection raises the grad-norm spike score (6σ/128, one-sided)",
        dirty > clean,
        f"{dirty:.3g}% with injection vs {clean:.3g}% clean",
    )
    verdict.check(
        "masking repeated n-grams lowers it", masked < dirty, f"{masked:.3g}% masked vs {dirty:.3g}% unmasked"
    )

    ratio_dirty = _injected_step_ratio(groups["inject+nofilter"])
    ratio_masked = _injected_step_ratio(groups["inject+filter"])
    masked_tokens = sum(sum(r.series(MASKED_TOKENS)[1]) for r in groups["inject+filter"])
    verdict.numbers["grad_norm_ratio_planted_steps/inject+nofilter"] = ratio_dirty
    verdict.numbers["grad_norm_ratio_planted_steps/inject+filter"] = ratio_masked
    verdict.numbers["masked_tokens/inject+filter"] = masked_tokens
    verdict.check(
        f"steps carrying a planted run have a larger grad norm (ratio > {MIN_GRAD_RATIO}) and the filter masked them",
        ratio_dirty is not None and ratio_dirty > MIN_GRAD_RATIO and masked_tokens > 0,
        f"ratio {ratio_dirty if ratio_dirty is None else f'{ratio_dirty:.3g}'} unmasked "
        f"({ratio_masked if ratio_masked is None else f'{ratio_masked:.3g}'} masked); "
        f"{masked_tokens:.0f} tokens masked",
    )
    verdict.notes = (
        "Spike scores count rare events; with one seed per group a difference of one or two "
        "spikes is within noise (the gpu preset uses 3 seeds)."
    )
    return verdict
