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

from proxy.analysis import spread
from proxy.records import PROBE_LOSS, Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, load_module

SPIKES = Path(__file__).resolve().parents[3] / "loss_spikes"
P1 = load_module(SPIKES)  # the loss-spike study's definitions
P2 = load_module(SPIKES / "protocol2")  # the largest rise
ARMS = ("none", "grad_clip", "zclip")
SEEDS = (6, 7, 8)
LARGE = P1.LARGE
FINAL_STEPS = 200
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


def final_log_loss(run: Run) -> float:
    """Mean log10 probe loss over the last FINAL_STEPS logged steps (nan without a probe)."""
    values = [v for v in run.series(PROBE_LOSS)[1] if math.isfinite(v) and v > 0][-FINAL_STEPS:]
    return sum(math.log10(v) for v in values) / len(values) if values else math.nan


def clip_events(run: Run) -> int:
    return sum(1 for e in run.events if e.get("event") == "zclip")


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="spike_remedies/clipping, protocol 2 (on loss spikes)", source=SOURCE)
    by_arm, missing = P1.runs_by_arm(runs, ARMS, SEEDS, arm=arm_of)
    if missing:
        v.check(f"the sweep has the arms {', '.join(ARMS)} with seeds {SEEDS}", False, f"short: {missing}")
        return v
    found = {arm: {s: P1.excursions(r) for s, r in seeds.items()} for arm, seeds in by_arm.items()}
    large = {arm: [sum(e.peak >= LARGE for e in found[arm][s]) for s in SEEDS] for arm in ARMS}
    rise = {arm: [P2.largest_peak(by_arm[arm][s]) for s in SEEDS] for arm in ARMS}
    final = {arm: [final_log_loss(by_arm[arm][s]) for s in SEEDS] for arm in ARMS}
    for arm in ARMS:
        v.numbers[f"events/{arm}"] = {
            str(s): [f"{e.kind}@{e.step} peak {e.peak:.3g}" for e in found[arm][s]] for s in SEEDS
        }
        v.numbers[f"large_excursions/{arm}"] = large[arm]
        v.numbers[f"largest_rise/{arm}"] = [round(x, 4) for x in rise[arm]]
        v.numbers[f"final_log10_probe_loss/{arm}"] = spread(final[arm]).describe(".2f")
    v.numbers["zclip_events_per_run"] = [clip_events(by_arm["zclip"][s]) for s in SEEDS]
    for arm in ("grad_clip", "zclip"):
        v.numbers[f"{arm}_minus_none/final_log10_probe_loss"] = spread(
            a - b for a, b in zip(final[arm], final["none"])
        ).describe(".2f")

    onsets = {arm: {s: P1.onset(r) for s, r in seeds.items()} for arm, seeds in by_arm.items()}
    v.numbers["low_noise_onset"] = {arm: {str(s): o for s, o in x.items()} for arm, x in onsets.items()}
    v.design(
        f"the unclipped arm reaches the low-noise phase (probe loss < {P1.LOW_NOISE} nats) by step {P1.ONSET_BY} "
        "in every seed",
        all(o is not None and o <= P1.ONSET_BY for o in onsets["none"].values()),
        f"onset steps {list(onsets['none'].values())}",
        "a run long enough to reach the low-noise phase",
    )
    v.design(
        f"the unclipped arm has a large loss spike (peak >= {LARGE} nats) in >= 2 of 3 seeds",
        sum(n >= 1 for n in large["none"]) >= 2,
        f"large excursions per seed {large['none']}",
        "more seeds or longer runs, so that loss spikes occur without clipping",
    )
    if not v.testable:
        return v

    fewer = spread(large["zclip"]).mean < spread(large["grad_clip"]).mean
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
    worse = spread(z - f for z, f in zip(final["zclip"], final["grad_clip"]))
    v.check(
        f"ZClip trains at least as well: final loss (mean log10 probe loss, last {FINAL_STEPS} steps) zclip - fixed "
        "not above 0 beyond 2 SE",
        math.isfinite(worse.mean) and worse.mean - 2 * worse.sem <= 0,
        f"zclip - fixed: {worse.describe('.2f')} decades",
    )
    return v
