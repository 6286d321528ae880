"""Verdict, protocol 2: repeated n-grams raise the grad-norm spike score and masking them lowers it
(OLMo 2, arXiv 2501.00656, Sec. 3.1), in every seed.

Runs are grouped by ``data.inject.enabled`` x ``data.ngram_filter.enabled`` and paired by
``train.seed`` (the four groups of one seed share the init and the base data; in the lab preset the
seed also moves the data stream, so the planted runs land elsewhere in each seed). Every effect is
measured once per seed and must clear its spread (:meth:`proxy.analysis.Spread.clears`: every seed
with the claimed sign, the mean beyond 2 standard errors, >= 3 seeds). Criteria, written before
the run:

1. The filter leaves clean data alone: in every seed it masks < 0.1 % of the clean run's tokens
   (a filter that masked everything would lower any score).
2. The mechanism: without the filter, steps whose batch carries a planted run have a mean grad norm
   more than 1.1x that of the other steps (ratio - 1.1 clears the spread).
3. Masking removes it: ratio(unfiltered) - ratio(filtered) > 0, and the filter masked tokens in
   every seed.
4. Injection raises the grad-norm spike score: score(inject) - score(clean) > 0, both unfiltered.
5. Masking lowers it: score(inject, unfiltered) - score(inject, filtered) > 0.

Spike scores (percent of scored steps) use OLMo-core's detector (>= 6 sigma above the mean of the
previous 128 values): a lab run is 1200 steps, and OLMo 2's 7 sigma / 1000-step window scores only
its last 200; that score is reported beside it, with the loss's spike scores, never judged.
Protocol 1 (one seed, criteria on group means) is in ``protocol1/``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from proxy import records
from proxy.analysis import OLMO2_SPIKES, OLMO_CORE_SPIKES, Spread, spike_score, spread
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict

GRAD_NORM, LOSS = records.GRAD_NORM, records.TRAIN_LOSS
INJECTED_ROWS, MASKED_TOKENS = records.DATA_INJECTED_ROWS, records.DATA_MASKED_TOKENS
MIN_GRAD_RATIO = 1.1
CLEAN_MASK_LIMIT = 1e-3  # criterion 1: fraction of a clean run's tokens the filter may mask
GROUPS = ("clean+nofilter", "clean+filter", "inject+nofilter", "inject+filter")
SOURCE = "OLMo 2 (arXiv 2501.00656) Sec. 3.1: repeated n-grams cause grad-norm spikes; filtering them reduces spikes"


def _switch(run: Run, section: str) -> bool:
    node: Any = run.config.get("data", {}).get(section, {})
    return bool(node.get("enabled", False)) if isinstance(node, dict) else False


def _group(run: Run) -> str:
    inject = "inject" if _switch(run, "inject") else "clean"
    return f"{inject}+{'filter' if _switch(run, 'ngram_filter') else 'nofilter'}"


def _seed(run: Run) -> int:
    return int(run.config_value("train.seed") or 0)


def planted_step_ratio(run: Run) -> Optional[float]:
    """Mean grad norm on steps whose batch carried a planted run / on the other steps."""
    steps, norms = run.series(GRAD_NORM)
    planted = dict(zip(*run.series(INJECTED_ROWS)))
    flags = np.array([planted.get(s, 0.0) > 0 for s in steps])
    values = np.asarray(norms, dtype=float)
    ok = np.isfinite(values)
    if not (flags[ok].any() and (~flags[ok]).any()):
        return None
    return float(values[ok & flags].mean() / values[ok & ~flags].mean())


def _tokens(run: Run) -> int:
    cfg = run.config.get("train", {})
    return int(cfg.get("batch_size", 0)) * int(cfg.get("seq_len", 0)) * len(run.series(GRAD_NORM)[1])


def _paired(values: dict[str, dict[int, float]], a: str, b: str, seeds: list[int]) -> Spread:
    return spread(values[a][s] - values[b][s] for s in seeds if s in values[a] and s in values[b])


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="repeated_ngrams", source=SOURCE)
    by: dict[str, dict[int, Run]] = {}
    for run in runs:
        if run.series(GRAD_NORM)[1]:
            by.setdefault(_group(run), {})[_seed(run)] = run
    missing = [g for g in GROUPS if g not in by]
    if missing:
        v.check(
            "the sweep has clean and injected runs, each with and without the filter, with a grad-norm series",
            False,
            f"missing: {', '.join(missing)}",
        )
        return v
    seeds = sorted(set.intersection(*(set(by[g]) for g in GROUPS)))
    v.numbers["seeds"] = seeds

    score: dict[str, dict[int, float]] = {g: {} for g in GROUPS}
    for g in GROUPS:
        for s in seeds:
            value = spike_score(by[g][s].series(GRAD_NORM)[1], OLMO_CORE_SPIKES)
            if value is not None:
                score[g][s] = value
        runs_g = [by[g][s] for s in seeds]
        for name, key, options in (
            ("grad_norm", GRAD_NORM, OLMO_CORE_SPIKES),
            ("grad_norm_olmo2", GRAD_NORM, OLMO2_SPIKES),
            ("loss", LOSS, OLMO_CORE_SPIKES),
        ):
            values = [spike_score(r.series(key)[1], options) for r in runs_g]
            v.numbers[f"spike_score_{name}/{g}"] = (
                spread(x for x in values if x is not None).describe(".3g")
                if any(x is not None for x in values)
                else "not scored"
            )
        losses = [x for r in runs_g if (x := r.summary.final_val_loss) is not None]
        v.numbers[f"final_val_loss/{g}"] = spread(losses).describe(".4f") if losses else "n/a"

    clean_masked = {
        s: sum(by["clean+filter"][s].series(MASKED_TOKENS)[1]) / max(1, _tokens(by["clean+filter"][s])) for s in seeds
    }
    v.check(
        f"the filter leaves clean data alone: < {100 * CLEAN_MASK_LIMIT:g}% of a clean run's tokens masked, every seed",
        bool(seeds) and all(x < CLEAN_MASK_LIMIT for x in clean_masked.values()),
        ", ".join(f"seed {s}: {100 * x:.3g}%" for s, x in clean_masked.items()),
    )

    ratio = {
        g: {s: r for s in seeds if (r := planted_step_ratio(by[g][s])) is not None}
        for g in ("inject+nofilter", "inject+filter")
    }
    dirty = ratio["inject+nofilter"]
    mech = spread(dirty[s] - MIN_GRAD_RATIO for s in seeds if s in dirty)
    v.check(
        f"steps carrying a planted run have > {MIN_GRAD_RATIO}x the grad norm of the others (unfiltered)",
        mech.clears(+1),
        f"ratio {spread(dirty.values()).describe('.3g')}",
    )

    masked = {s: sum(by["inject+filter"][s].series(MASKED_TOKENS)[1]) for s in seeds}
    removed = _paired(ratio, "inject+nofilter", "inject+filter", seeds)
    v.check(
        "masking removes it: ratio unfiltered - filtered > 0, and the filter masked tokens in every seed",
        removed.clears(+1) and all(m > 0 for m in masked.values()),
        f"{removed.describe('.3g')}; filtered ratio {spread(ratio['inject+filter'].values()).describe('.3g')}; "
        f"tokens masked {', '.join(f'{m:.0f}' for m in masked.values())}",
    )

    def per_seed(group: str) -> str:
        return ", ".join(f"seed {s}: {score[group][s]:.3g}%" for s in seeds if s in score[group])

    raised = _paired(score, "inject+nofilter", "clean+nofilter", seeds)
    v.check(
        "injection raises the grad-norm spike score (6 sigma / 128): inject - clean > 0",
        raised.clears(+1),
        f"{raised.describe('.3g')} points of %; injected {per_seed('inject+nofilter')}; "
        f"clean {per_seed('clean+nofilter')}",
    )

    lowered = _paired(score, "inject+nofilter", "inject+filter", seeds)
    v.check(
        "masking lowers it: unfiltered - filtered > 0",
        lowered.clears(+1),
        f"{lowered.describe('.3g')} points of %; filtered {per_seed('inject+filter')}",
    )

    v.numbers["grad_norm_ratio_planted_steps/inject+nofilter"] = {s: round(x, 4) for s, x in dirty.items()}
    v.numbers["grad_norm_ratio_planted_steps/inject+filter"] = {
        s: round(x, 4) for s, x in ratio["inject+filter"].items()
    }
    v.numbers["masked_tokens/inject+filter"] = masked
    v.numbers["masked_fraction/clean+filter"] = {s: round(x, 6) for s, x in clean_masked.items()}
    v.notes = (
        "Spike scores count rare events (a few per 1000 steps here): each seed's difference is a "
        "difference of counts, and the spread over seeds is what says whether it is more than noise."
    )
    return v
