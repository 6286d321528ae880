"""Verdict: do spike remedies keep a stretch of bad data from damaging training?

Sources: PaLM (arXiv 2204.02311) §5.1 — on a loss spike, restart ~100 steps earlier and skip
200-500 batches; LLM360 K2 did the same. OLMo-core's SkipStepOptimizer skips updates whose loss or
grad norm is an outlier (6σ over the last 128 steps). ZClip (arXiv 2504.02507) clips outlier
gradient norms against an EMA. OLMo 2 (arXiv 2501.00656) §3.1 masks repeated n-grams in the data.

The study (conf/experiment/spike_remedies_*.yaml) plants repeated n-grams in a window of batches
and runs six arms (conf/arm/) per seed. Each run is placed in an arm from its config alone, so
hand-made runs are judged too: no injection -> ``clean``; injection + n-gram filter -> ``mask``;
injection otherwise -> its ``remedy.kind`` (``none``, ``skip_step``, ``rollback``, ``zclip``).

**Damage** of a run = the largest excess of its val loss (held-out clean data, logged every
``eval_every`` steps) over the clean run with the same ``train.seed``, over the window and as
long again after it: [start, end + (end - start)). It measures harm to the model, not the high
train loss on the bad batches themselves (which no optimizer-side remedy can lower). Criteria,
all required for REPRODUCED:

1. the bad data harms the unprotected run: mean damage of ``none`` > 0.05 nats, > 0 in every seed;
2. for each remedy arm present (``skip_step``, ``rollback``, ``zclip``, ``mask``): its mean damage
   is at most half that of ``none``.

Also reported per arm (``numbers``, and the table in the notes): final val loss minus clean, the
grad-norm and loss spike scores of the kept trajectory (OLMo-core's 6σ/128 one-sided detector),
remedy actions per run, steps computed and thrown away by rollbacks, rollbacks that resumed inside
the bad window (their skip did not clear it), tokens masked, and the mean Adam update size over
the planted window (update RMS / LR, averaged over parameters; logged on logging steps). One reference number: what the
clean run gains over the window (val loss at its start minus at its end), which is the damage a
remedy that skipped every bad step would still show at the window's end: skipped steps are lost
progress, while a rollback re-runs them on fresh data and a mask keeps the clean part of each batch.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any, Optional

from proxy import records
from proxy.analysis import OLMO_CORE_SPIKES, spike_score
from proxy.records import Run
from proxy.report import ReportResult
from proxy.report.document import markdown_table
from proxy.verdict import Verdict

VAL, TRAIN, GRAD_NORM = records.VAL_LOSS, records.TRAIN_LOSS, records.GRAD_NORM
MASKED, UPDATE = records.DATA_MASKED_TOKENS, records.UPDATE_RMS
ARMS = ("clean", "none", "skip_step", "rollback", "zclip", "mask")
REMEDIES = ("skip_step", "rollback", "zclip", "mask")
MIN_DAMAGE = 0.05  # nats: below this the study provoked nothing worth protecting against
MAX_DAMAGE_FRACTION = 0.5  # a remedy must at least halve the damage
REPORT_SPIKES = OLMO_CORE_SPIKES  # the report beside the verdict scores spikes as the verdict does


def config_value(run: Run, dotted: str) -> Any:
    return run.config_value(dotted)


def arm_of(run: Run) -> str:
    if not config_value(run, "data.inject.enabled"):
        return "clean"
    if config_value(run, "data.ngram_filter.enabled"):
        kind = str(config_value(run, "remedy.kind") or "none")
        return "mask" if kind == "none" else f"mask+{kind}"
    return str(config_value(run, "remedy.kind") or "none")


def injection_window(runs: list[Run]) -> Optional[tuple[int, int]]:
    """[start, end) of the planted batches (batch indices, = steps unless a rollback skipped data)."""
    for run in runs:
        start, end = config_value(run, "data.inject.start_step"), config_value(run, "data.inject.end_step")
        if config_value(run, "data.inject.enabled") and start is not None and end is not None:
            return int(start), int(end)
    return None


def window_of(runs: list[Run]) -> Optional[tuple[int, int]]:
    """[start, end + (end - start)): the injection window and as long again to recover."""
    window = injection_window(runs)
    return None if window is None else (window[0], 2 * window[1] - window[0])


def clean_gain(clean: Run, window: tuple[int, int]) -> Optional[float]:
    """Val loss at the window's start minus at its end, in the clean run (nearest eval steps)."""
    steps, values = clean.series(VAL)
    before = [v for s, v in zip(steps, values) if s <= window[0]]
    after = [v for s, v in zip(steps, values) if s >= window[1]]
    return before[-1] - after[0] if before and after else None


def window_update_rms(run: Run, window: tuple[int, int]) -> Optional[float]:
    """Mean Adam update size over the planted window: update RMS / LR, averaged over parameters."""
    per_param = []
    for key in (k for k in run.keys() if k.startswith(UPDATE)):
        inside = [v for s, v in zip(*run.series(key)) if window[0] <= s < window[1] and math.isfinite(v)]
        if inside:
            per_param.append(statistics.fmean(inside))
    return statistics.fmean(per_param) if per_param else None


def resumed_inside(run: Run, window: tuple[int, int]) -> int:
    """Rollbacks whose data position after the skip still lay in the planted window."""
    return sum(e.get("event") == "rollback" and window[0] <= e.get("data_position", -1) < window[1] for e in run.events)


def damage(run: Run, clean: Run, window: tuple[int, int]) -> Optional[float]:
    """Max over the window's eval steps of val(run) - val(clean) at the same step."""
    reference = dict(zip(*clean.series(VAL)))
    excess = [
        v - reference[s]
        for s, v in zip(*run.series(VAL))
        if window[0] <= s < window[1] and s in reference and math.isfinite(v)
    ]
    return max(excess) if excess else None


def final_excess(run: Run, clean: Run) -> Optional[float]:
    a, b = run.summary.final_val_loss, clean.summary.final_val_loss
    return a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def _mean_sd(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(mean: Optional[float], sd: Optional[float], digits: int = 3) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def arm_table(runs: list[Run]) -> tuple[dict[str, dict[str, Any]], Optional[tuple[int, int]]]:
    """Per arm: the paired damage and final excess per seed, spike scores, actions, costs."""
    by_arm: dict[str, dict[Any, Run]] = defaultdict(dict)
    for run in runs:
        if run.status == "completed" and run.series(VAL)[0]:
            by_arm[arm_of(run)][config_value(run, "train.seed")] = run
    window = window_of(runs)
    planted = injection_window(runs)
    clean = by_arm.get("clean", {})
    table: dict[str, dict[str, Any]] = {}
    for arm, seeds in by_arm.items():
        paired = {seed: run for seed, run in seeds.items() if seed in clean}
        rows = {
            "seeds": sorted(seeds, key=str),
            "damage": {s: damage(r, clean[s], window) for s, r in paired.items()} if window else {},
            "final_excess": {s: final_excess(r, clean[s]) for s, r in paired.items()},
            "final_val": [r.summary.final_val_loss for r in seeds.values()],
            "spike_grad_norm": [spike_score(r.series(GRAD_NORM)[1], OLMO_CORE_SPIKES) for r in seeds.values()],
            "spike_loss": [spike_score(r.series(TRAIN)[1], OLMO_CORE_SPIKES) for r in seeds.values()],
            "actions": [
                sum(e.get("event") in ("skip_step", "rollback", "zclip") for e in r.events) for r in seeds.values()
            ],
            "rollbacks": [sum(e.get("event") == "rollback" for e in r.events) for r in seeds.values()],
            "thrown_away": [sum(sum(TRAIN in row for row in b.rows) for b in r.abandoned) for r in seeds.values()],
            "resumed_inside": [resumed_inside(r, planted) if planted else 0 for r in seeds.values()],
            "update_rms": [window_update_rms(r, planted) if planted else None for r in seeds.values()],
            "masked": [sum(r.series(MASKED)[1]) for r in seeds.values()],
        }
        table[arm] = rows
    return table, window


def _markdown(table: dict[str, dict[str, Any]], window: Optional[tuple[int, int]]) -> str:
    headers = [
        "arm",
        "seeds",
        "damage (nats)",
        "final val − clean",
        "final val",
        "grad-norm spikes %",
        "loss spikes %",
        "actions / run",
        "steps thrown away / run",
        "rollbacks resuming in the window",
        "tokens masked / run",
        "update RMS / LR in the window",
    ]
    rows = []
    for arm in [a for a in ARMS if a in table] + sorted(set(table) - set(ARMS)):
        t = table[arm]
        rows.append(
            [
                arm,
                len(t["seeds"]),
                _fmt(*_mean_sd(list(t["damage"].values()))),
                _fmt(*_mean_sd(list(t["final_excess"].values()))),
                _fmt(*_mean_sd(t["final_val"])),
                _fmt(*_mean_sd(t["spike_grad_norm"]), digits=2),
                _fmt(*_mean_sd(t["spike_loss"]), digits=2),
                _fmt(*_mean_sd(t["actions"]), digits=1),
                _fmt(*_mean_sd(t["thrown_away"]), digits=0),
                f"{sum(t['resumed_inside'])} of {sum(t['rollbacks'])}",
                _fmt(*_mean_sd(t["masked"]), digits=0),
                _fmt(*_mean_sd(t["update_rms"])),
            ]
        )
    lines = [
        f"Damage: max excess of val loss over the clean run of the same seed, steps "
        f"{window[0] if window else '?'}-{window[1] if window else '?'}; mean ± sd over seeds.",
        "",
        *markdown_table(headers, rows),
    ]
    return "\n".join(lines)


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    verdict = Verdict(
        finding="spike_remedies",
        source="PaLM (arXiv 2204.02311) §5.1 rollback + skip; OLMo-core skip-step; ZClip (arXiv 2504.02507); "
        "OLMo 2 (arXiv 2501.00656) §3.1 n-gram masking",
    )
    table, window = arm_table(runs)
    missing = [a for a in ("clean", "none") if a not in table]
    if missing or window is None:
        verdict.check(
            "the sweep has clean and unprotected (injection, no remedy) runs with val losses",
            False,
            f"missing arms: {', '.join(missing) or '—'}; injection window: {window}",
        )
        return verdict
    for arm, t in table.items():
        for key in ("damage", "final_excess"):
            mean, sd = _mean_sd(list(t[key].values()))
            verdict.numbers[f"{key}/{arm}"] = mean
            verdict.numbers[f"{key}_sd/{arm}"] = sd
        for key in ("spike_grad_norm", "spike_loss", "actions", "thrown_away", "masked", "update_rms"):
            verdict.numbers[f"{key}/{arm}"] = _mean_sd(t[key])[0]
        verdict.numbers[f"seeds/{arm}"] = len(t["seeds"])

    base = [v for v in table["none"]["damage"].values() if v is not None]
    base_mean = statistics.fmean(base) if base else None
    verdict.check(
        f"the bad data harms the unprotected run (mean damage > {MIN_DAMAGE} nats, > 0 in every seed)",
        base_mean is not None and base_mean > MIN_DAMAGE and all(v > 0 for v in base),
        f"damage {_fmt(*_mean_sd(base))} nats over {len(base)} seeds ({', '.join(f'{v:.3f}' for v in base)})",
    )
    for arm in REMEDIES:
        if arm not in table:
            continue
        values = [v for v in table[arm]["damage"].values() if v is not None]
        mean = statistics.fmean(values) if values else None
        verdict.check(
            f"{arm} at least halves the damage",
            mean is not None and base_mean is not None and mean <= MAX_DAMAGE_FRACTION * base_mean,
            f"{_fmt(*_mean_sd(values))} vs {_fmt(*_mean_sd(base))} without a remedy"
            + (f" ({mean / base_mean:.0%} of it)" if mean is not None and base_mean else ""),
        )
    gains = [g for run in _clean_runs(runs) if (g := clean_gain(run, injection_window(runs))) is not None]
    verdict.numbers["clean_gain_over_window"] = statistics.fmean(gains) if gains else None
    verdict.notes = _markdown(table, window)
    if gains:
        verdict.notes += (
            f"\n\nReference: the clean run improves its val loss by {statistics.fmean(gains):.3f} nats over "
            "the bad-data window; a remedy that skipped every bad step would still be about that far "
            "behind at the window's end (lost steps, not harm)."
        )
    return verdict


def _clean_runs(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.status == "completed" and arm_of(r) == "clean" and r.series(VAL)[0]]
