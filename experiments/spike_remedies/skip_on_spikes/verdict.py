"""Verdict: skip-step on loss spikes that happen (criteria committed before the run;
experiments/spike_remedies/README.md "Skip-step on the loss-spike organism").

OLMo-core skips the optimizer update of a step whose loss or gradient norm is an outlier, so that a
spike's step does not move the weights. The lab judged it on planted poison batches
(``isolated/``: REPRODUCED) and on a stretch of bad data (no help); both are data-driven. The
loss-spike organism's spikes are optimizer-driven (Adam's second moment out of date in a low-noise
phase, experiments/loss_spikes). This study runs that recipe (``+experiment=loss_spikes/lab``) with
two arms on fresh seeds 9, 10, 11: ``none`` and ``skip_step`` (conf/loss_spike_arm/skip_step.yaml:
the default detector, ``remedy.detector``, on the train loss and grad norm of each step). Quantities
as the ZClip study's on this organism (``organism.py``): large excursions (peak >= 0.1 nats) of the
probe loss by the committed definition, a run's largest rise, its final loss.

Design checks (else NOT TESTABLE AT THIS SCALE): the none arm reaches the low-noise phase (probe
loss < 0.01 nats) by step 1000 in every seed, and has a large excursion in >= 2 of 3 seeds.

Criteria:

1. Skip-step has fewer loss spikes: fewer large excursions than none on average, more in no seed.
2. Its spikes are smaller: the largest rise below none's in every seed.
3. It trains at least as well: the paired difference skip_step - none of the final loss (mean log10
   probe loss over the last 200 steps) is not above 0 beyond 2 SE.

Reported, not judged: steps skipped per run, runs ended by ``remedy.max_consecutive_skips``, every
excursion.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, load_script

ORGANISM = load_script(Path(__file__).resolve().parents[1] / "organism.py")
P1 = ORGANISM.P1
ARMS = ("none", "skip_step")
SEEDS = (9, 10, 11)
excursions = P1.excursions  # for experiments/loss_spikes/figure.py --verdict
SOURCE = (
    "OLMo-core's skip-step (SkipStepOptimizer: no update on a loss or grad-norm outlier) against loss spikes; "
    "judged on the loss-spike organism (experiments/loss_spikes), whose spikes come from Adam, not from data"
)


def arm_of(run: Run) -> Optional[str]:
    kind = run.config_value("remedy.kind")
    if (run.config_value("optim.grad_clip") or 0) > 0 or run.config_value("optim.beta2") != 0.99:
        return None
    return {"skip_step": "skip_step", "none": "none", None: "none"}.get(kind)


def skipped(run: Run) -> int:
    return ORGANISM.events(run, "skip_step")


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="spike_remedies/skip_on_spikes", source=SOURCE)
    m = ORGANISM.collect(v, runs, ARMS, SEEDS, arm_of)
    if m is None:
        return v
    v.numbers["skipped_steps_per_run"] = [skipped(m.runs["skip_step"][s]) for s in SEEDS]
    v.numbers["status/skip_step"] = [m.runs["skip_step"][s].status for s in SEEDS]
    if not m.design(v, "none", "no-remedy", "without a remedy"):
        return v

    v.check(
        "skip-step has fewer loss spikes: fewer large excursions than none on average, more in no seed",
        sum(m.large["skip_step"]) < sum(m.large["none"])
        and all(a <= b for a, b in zip(m.large["skip_step"], m.large["none"])),
        f"large excursions per seed: skip_step {m.large['skip_step']} vs none {m.large['none']}",
    )
    v.check(
        "skip-step's spikes are smaller: its largest rise below none's in every seed",
        all(a < b for a, b in zip(m.rise["skip_step"], m.rise["none"])),
        f"largest rise: skip_step {[round(x, 3) for x in m.rise['skip_step']]} vs none "
        f"{[round(x, 3) for x in m.rise['none']]}",
    )
    worse = m.minus("skip_step", "none")
    v.check(
        f"skip-step trains at least as well: final loss (mean log10 probe loss, last {ORGANISM.FINAL_STEPS} steps) "
        "skip_step - none not above 0 beyond 2 SE",
        math.isfinite(worse.mean) and worse.mean - 2 * worse.sem <= 0,
        f"skip_step - none: {worse.describe('.2f')} decades",
    )
    return v
