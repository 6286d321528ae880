"""Verdict, protocol 2 of the clipping study: ZClip against fixed clipping on loss spikes that happen
(criteria committed before the run; experiments/spike_remedies/README.md "ZClip, protocol 2").

Protocol 1 (``clipping/verdict.py``) was NOT TESTABLE AT THIS SCALE: at LR 0.1/0.3 the tiny model
degrades without a single loss spike. The loss-spike organism (experiments/loss_spikes: the tiny
model on a deterministic language, constant LR 1e-2, beta2 0.99, no clipping) spikes in every seed:
its probe loss sits at ~1e-3 nats, then jumps to 1-7 nats and comes back. Protocol 2 runs that recipe
(``+experiment=loss_spikes/lab``) with three arms on fresh seeds 6, 7, 8: ``none``, ``grad_clip``
(fixed, global norm 1.0) and ``zclip`` (ZClip alone, conf/loss_spike_arm/zclip.yaml). The quantities
are the loss-spike study's (``P1``): **excursions** by the committed definition (proxy/spikes.py) on
the probe loss, **large** ones peaking >= 0.1 nats, a run's **largest rise** (its largest probe loss
from 20 steps after the low-noise onset on).

Design checks (else NOT TESTABLE AT THIS SCALE): the none arm reaches the low-noise phase (probe
loss < 0.01 nats) by step 1000 in every seed, and has a large excursion in >= 2 of 3 seeds.

Criteria (ZClip, Kumar et al. 2025: "reduces loss spikes" and trains at least as well as a fixed
threshold):

1. ZClip has fewer loss spikes than fixed clipping: the mean count of large excursions per run is
   lower with ZClip, and no seed has more with ZClip than with fixed clipping (same seed: same init
   and batches).
2. ZClip's spikes are smaller: its largest rise is below fixed clipping's in every seed.
3. ZClip trains at least as well: the paired difference, ZClip minus fixed, of the final loss (mean
   log10 probe loss over the last 200 steps: the loss lives near 1e-3) is not above 0 beyond its
   spread (mean - 2 SE <= 0; a non-inferiority bound set by the seed spread).

Reported, not judged: each arm against none, excursions per run with steps and peaks, clip events.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, load_script

ORGANISM = load_script(Path(__file__).resolve().parents[2] / "organism.py")  # what the organism studies share
P1 = ORGANISM.P1
ARMS = ("none", "grad_clip", "zclip")
SEEDS = (6, 7, 8)
LARGE = ORGANISM.LARGE
FINAL_STEPS = ORGANISM.FINAL_STEPS
final_log_loss = ORGANISM.final_log_loss
excursions = P1.excursions  # what the loss-spike study's figure marks (experiments/loss_spikes/figure.py)
SOURCE = (
    "ZClip (Kumar et al. 2025, arXiv 2504.02507): z-score adaptive clipping reduces loss spikes and trains at "
    "least as well as fixed-threshold clipping; judged on the loss-spike organism (experiments/loss_spikes)"
)


def arm_of(run: Run) -> Optional[str]:
    if run.config_value("remedy.kind") == "zclip":
        return "zclip" if not (run.config_value("optim.grad_clip") or 0) > 0 else None
    if run.config_value("remedy.kind") not in (None, "none"):
        return None
    arm = P1.arm_of(run)
    return arm if arm in ("none", "grad_clip") else None


def clip_events(run: Run) -> int:
    return ORGANISM.events(run, "zclip")


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="spike_remedies/clipping, protocol 2 (on loss spikes)", source=SOURCE)
    m = ORGANISM.collect(v, runs, ARMS, SEEDS, arm_of)
    if m is None:
        return v
    large, rise = m.large, m.rise
    v.numbers["zclip_events_per_run"] = [clip_events(m.runs["zclip"][s]) for s in SEEDS]
    for arm in ("grad_clip", "zclip"):
        v.numbers[f"{arm}_minus_none/final_log10_probe_loss"] = m.minus(arm, "none").describe(".2f")
    if not m.design(v, "none", "unclipped", "without clipping"):
        return v

    fewer = sum(large["zclip"]) < sum(large["grad_clip"])  # the same seeds: fewer on average
    v.check(
        "ZClip has fewer loss spikes than fixed clipping: fewer large excursions on average, more in no seed",
        fewer and all(z <= f for z, f in zip(large["zclip"], large["grad_clip"])),
        f"large excursions per seed: zclip {large['zclip']} vs fixed {large['grad_clip']} (none {large['none']})",
    )
    v.check(
        "ZClip's spikes are smaller: its largest rise below fixed clipping's in every seed",
        all(z < f for z, f in zip(rise["zclip"], rise["grad_clip"])),
        f"largest rise: zclip {[round(x, 3) for x in rise['zclip']]} vs fixed "
        f"{[round(x, 3) for x in rise['grad_clip']]} (none {[round(x, 3) for x in rise['none']]})",
    )
    worse = m.minus("zclip", "grad_clip")
    v.check(
        f"ZClip trains at least as well: final loss (mean log10 probe loss, last {FINAL_STEPS} steps) zclip - fixed "
        "not above 0 beyond 2 SE",
        math.isfinite(worse.mean) and worse.mean - 2 * worse.sem <= 0,
        f"zclip - fixed: {worse.describe('.2f')} decades",
    )
    return v
