"""Verdict: skip-step on isolated poison batches (OLMo-core's SkipStepOptimizer; llm.c): dropping
the update of a step whose grad norm (or loss) is > 6σ above the mean of the last 128 steps
keeps a rare bad batch from harming the model.

The sweep plants a few single poison batches (every row carries 32 back-to-back copies of a 1-4
token n-gram: ``data.inject`` with ``fraction: 1.0``) into otherwise clean training of the tiny
model. Protocol 1 (conf/experiment/spike_remedies/isolated_lab_p1.yaml, results/isolated/) put the
events 50 steps apart; protocol 2 (spike_remedies/isolated_lab.yaml, results/isolated/protocol2/)
puts them 150 steps apart, beyond the detector's 128-step window, and is judged by these same
criteria, unchanged. Both designs have three
arms (conf/arm/): ``clean`` (no poison), ``none`` and ``skip_step`` (default 6σ/128), each with
several seeds (``train.seed`` also seeds the data). **Harm of an event** = the largest excess of
the run's val loss (held-out clean data) over the clean run with the same seed, over the evals in
(p, p + 25] after poison step p; a run's harm is its mean over events. Criteria, written before
the run (effects per seed, :meth:`proxy.analysis.Spread.clears`: every seed positive and the mean
beyond 2 standard errors):

1. The design gives isolated spikes far above the detector's bar: in the ``none`` arm the grad
   norm at >= 3/4 of the poison steps is above mean + 6σ of the 128 steps before it, in every seed.
2. The poison harms the unprotected run: harm(none) > 0 clearing the spread, mean >= 0.01 nats.
3. Skip-step cuts the harm per event: harm(none) - harm(skip_step) > 0 clearing the spread, and
   harm(skip_step) at most half of harm(none) on the seed means.

Reported, not judged: skip events at poison steps and elsewhere (false positives), the z-score
of each poison step, the final val loss minus clean.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

import numpy as np

from proxy import records
from proxy.analysis import spread
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict

ARMS = ("clean", "none", "skip_step")
AFTER = 25  # steps after a poison step over which its harm is measured
SIGMA, WINDOW = 6.0, 128  # OLMo-core's skip-step detector
MIN_HARM = 0.01  # nats
SOURCE = (
    "OLMo-core SkipStepOptimizer / llm.c: skip the update of a step whose loss or grad norm is a "
    "6σ outlier over the last 128 steps, so an isolated bad batch does no harm"
)


def arm_of(run: Run) -> Optional[str]:
    if not run.config_value("data.inject.enabled"):
        return "clean"
    kind = str(run.config_value("remedy.kind") or "none")
    return kind if kind in ARMS else None


def poison_steps(run: Run) -> list[int]:
    """The steps that received a poison batch (batch index = step: skip-step never skips data)."""
    start, end = run.config_value("data.inject.start_step"), run.config_value("data.inject.end_step")
    every, steps = int(run.config_value("data.inject.every") or 1), int(run.config_value("train.steps") or 0)
    if start is None:
        return []
    return list(range(int(start), min(int(end) if end is not None else steps, steps), every))


def z_at(run: Run, step: int) -> float:
    """How many standard deviations the grad norm at ``step`` lies above the mean of the 128 steps before."""
    steps, values = run.series(records.GRAD_NORM)
    by_step = dict(zip(steps, values))
    history = [by_step[s] for s in range(step - WINDOW, step) if s in by_step and math.isfinite(by_step[s])]
    if len(history) < 20 or step not in by_step:
        return math.nan
    sd = float(np.std(history))
    return (by_step[step] - float(np.mean(history))) / sd if sd > 0 else math.inf


def harm(run: Run, clean: Run, events: list[int]) -> float:
    reference = dict(zip(*clean.series(records.VAL_LOSS)))
    per_event = []
    for p in events:
        excess = [
            v - reference[s]
            for s, v in zip(*run.series(records.VAL_LOSS))
            if p < s <= p + AFTER and s in reference and math.isfinite(v)
        ]
        if excess:
            per_event.append(max(excess))
    return statistics.fmean(per_event) if per_event else math.nan


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="spike_remedies/isolated", source=SOURCE)
    by_arm: dict[str, dict[int, Run]] = {}
    for run in runs:
        arm = arm_of(run)
        if arm is not None and run.status == records.COMPLETED:
            by_arm.setdefault(arm, {})[int(run.config_value("train.seed") or 0)] = run
    if not set(ARMS) <= set(by_arm):
        v.check("the sweep has the arms clean, none, skip_step", False, f"arms found: {sorted(by_arm)}")
        return v
    none, skip, clean = by_arm["none"], by_arm["skip_step"], by_arm["clean"]
    events = poison_steps(next(iter(none.values())))
    v.numbers["poison_steps"] = events

    z = {s: [z_at(r, p) for p in events] for s, r in sorted(none.items())}
    above = {s: sum(x > SIGMA for x in zs) for s, zs in z.items()}
    v.numbers["grad_norm_z_at_poison_steps/none"] = {str(s): [round(x, 1) for x in zs] for s, zs in z.items()}
    v.check(
        f"isolated spikes: the grad norm at >= 3/4 of poison steps is > {SIGMA:g}σ above the last {WINDOW} "
        "steps, in every seed (no remedy)",
        bool(events) and all(n >= 0.75 * len(events) for n in above.values()),
        "; ".join(f"seed {s}: {n} of {len(events)}" for s, n in above.items()),
    )

    seeds = sorted(set(none) & set(skip) & set(clean))
    h_none = spread(harm(none[s], clean[s], events) for s in seeds)
    h_skip = spread(harm(skip[s], clean[s], events) for s in seeds)
    v.numbers["harm_per_event/none"] = h_none.describe(".4f")
    v.numbers["harm_per_event/skip_step"] = h_skip.describe(".4f")
    v.check(
        f"the poison harms the unprotected run (harm per event > 0, mean >= {MIN_HARM} nats)",
        h_none.clears(+1) and h_none.mean >= MIN_HARM,
        h_none.describe(".4f"),
    )
    cut = spread(a - b for a, b in zip(h_none.values, h_skip.values))
    v.check(
        "skip-step cuts the harm per event (none - skip_step > 0) and at least halves it",
        cut.clears(+1) and h_skip.mean <= 0.5 * h_none.mean,
        f"{cut.describe('.4f')}; skip_step {h_skip.mean:.4f} vs none {h_none.mean:.4f}",
    )

    skips = {
        s: [int(e["step"]) for e in r.events if e.get(records.EVENT) == records.SKIP_STEP]
        for s, r in sorted(skip.items())
    }
    v.numbers["skips_at_poison_steps"] = {str(s): sum(x in events for x in xs) for s, xs in skips.items()}
    v.numbers["skips_elsewhere"] = {str(s): sum(x not in events for x in xs) for s, xs in skips.items()}
    for arm, mine in (("none", none), ("skip_step", skip)):
        v.numbers[f"final_val_minus_clean/{arm}"] = spread(
            _difference(mine[s].summary.final_val_loss, clean[s].summary.final_val_loss) for s in seeds
        ).describe(".4f")
    return v


def _difference(a: Optional[float], b: Optional[float]) -> float:
    """a - b, nan where either run recorded no value."""
    return math.nan if a is None or b is None else a - b
