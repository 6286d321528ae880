"""Verdict, protocol 2: the large loss spikes of protocol 1, tested on fresh seeds (criteria committed
before the run; experiments/loss_spikes/README.md "Protocol 2").

Protocol 1 (seeds 0-2) judged every excursion the committed definition finds, most of them rises of
0.001-0.009 nats on a loss near 1e-4. Looking at its runs afterwards (exploration, not a verdict):
every excursion that peaked at >= 0.1 nats (16 of 16, spikes and collapses, in every arm) had the
max-over-tensors RMS_t above 1 (1.35-10.1) in the 8 steps before it, against 12 of 48 small ones and
36% of all steps; update clipping left as many excursions but smaller peaks (0.17-0.80 nats against
0.18-5.75 without). Protocol 2 asks whether that holds on seeds 3, 4, 5, with the same recipe, the
same spike definition (proxy/spikes.py) and four of the arms (none, beta2_095, beta2_0999,
update_clip). A **large excursion** peaks at >= ``LARGE`` = 0.1 nats (protocol 1's criterion-1 size).

Design check: as protocol 1 (the none arm reaches probe loss < 0.01 nats by step 1000 in every seed);
and the none arm has >= 1 large excursion in >= 2 of the 3 seeds (else there is too little to judge:
NOT TESTABLE AT THIS SCALE).

Criteria:

1. RMS_t > 1 precedes the large excursions: over the large excursions of the four arms, the
   fraction f with max RMS_t > 1 at some step of the 8 before the crossing is >= 0.5 and its Wilson
   95% lower bound is above g, the same fraction over every probe step after the low-noise onset of
   the same runs (protocol 1's criterion 3, on the large excursions).
2. Update clipping shrinks them: in every seed, the largest rise with update clipping is below that
   of the none arm with the same seed. The largest rise of a run is its largest probe loss from 20
   steps after its low-noise onset on (whether or not the definition counts it: protocol 1's
   definition missed a visible 0.23-nat rise at step 1711 of none/seed 0).
3. They grow with beta2: the per-seed log10 of the largest rise is ordered
   mean(0.95) < mean(0.99) and mean(0.95) < mean(0.999), and the per-seed difference 0.999 - 0.95
   clears its spread (every seed positive, mean beyond 2 SE).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from proxy.analysis import spread
from proxy.records import PROBE_LOSS, Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, load_module

P1 = load_module(Path(__file__).resolve().parents[1])  # protocol 1's arms, definitions and helpers
ARMS = ("none", "beta2_095", "beta2_0999", "update_clip")
NO_CLIP = ("beta2_095", "none", "beta2_0999")  # beta2 0.95, 0.99, 0.999
SEEDS = (3, 4, 5)
LARGE = P1.LARGE
SETTLE = 20  # steps after the low-noise onset before the largest rise is looked for
SOURCE = P1.SOURCE


def largest_peak(run: Run) -> float:
    """The largest probe loss after the low-noise onset (+ ``SETTLE`` steps): the height of the
    run's largest rise, whether or not the spike definition counts it (nan: no onset)."""
    start = P1.onset(run)
    if start is None:
        return math.nan
    steps, values = run.series(PROBE_LOSS)
    after = [x for s, x in zip(steps, values) if s > start + SETTLE]
    return max(after) if after else math.nan


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="loss_spikes/protocol2", source=SOURCE)
    by_arm: dict[str, dict[int, Run]] = defaultdict(dict)
    for run in runs:
        arm, seed = P1.arm_of(run), run.config_value("train.seed")
        if arm in ARMS and seed in SEEDS and run.error is None:
            by_arm[arm][int(seed)] = run
    missing = [a for a in ARMS if sorted(by_arm.get(a, {})) != list(SEEDS)]
    if missing:
        v.check(f"the sweep has the arms {', '.join(ARMS)} with seeds {SEEDS}", False, f"short: {missing}")
        return v
    found = {arm: {s: P1.excursions(r) for s, r in seeds.items()} for arm, seeds in by_arm.items()}
    for arm in ARMS:
        v.numbers[f"events/{arm}"] = {
            str(s): [f"{e.kind}@{e.step} peak {e.peak:.3g}" for e in found[arm][s]] for s in SEEDS
        }
        v.numbers[f"largest_rise/{arm}"] = [round(largest_peak(by_arm[arm][s]), 4) for s in SEEDS]

    onsets = {arm: {s: P1.onset(r) for s, r in seeds.items()} for arm, seeds in by_arm.items()}
    v.numbers["low_noise_onset"] = {arm: {str(s): o for s, o in x.items()} for arm, x in onsets.items()}
    v.design(
        f"the spiking arm (beta2 0.99) reaches the low-noise phase (probe loss < {P1.LOW_NOISE} nats) by step "
        f"{P1.ONSET_BY} in every seed",
        all(o is not None and o <= P1.ONSET_BY for o in onsets["none"].values()),
        f"onset steps {list(onsets['none'].values())}",
        "a run long enough to reach the low-noise phase",
    )
    large_none = [sum(e.peak >= LARGE for e in found["none"][s]) for s in SEEDS]
    v.design(
        f"the spiking arm has a large excursion (peak >= {LARGE} nats) in >= 2 of 3 seeds",
        sum(n >= 1 for n in large_none) >= 2,
        f"large excursions per seed {large_none}",
        "more seeds or longer runs, so that large spikes occur often enough to be judged",
    )
    if not v.testable:
        return v

    # -- 1. RMS_t > 1 before the large excursions, against every step ---------------------------
    pick = {(arm, s): [e for e in found[arm][s] if e.peak >= LARGE] for arm in ARMS for s in SEEDS}
    P1.check_rms_before(v, by_arm, pick, onsets, "large excursions")

    # -- 2. update clipping shrinks them ----------------------------------------------------------
    clipped = [largest_peak(by_arm["update_clip"][s]) for s in SEEDS]
    plain = [largest_peak(by_arm["none"][s]) for s in SEEDS]
    ratio = spread(math.log10(c / p) for c, p in zip(clipped, plain))
    v.check(
        "update clipping shrinks the largest rise: below the none arm's in every seed",
        all(c < p for c, p in zip(clipped, plain)),
        f"largest rise with update clipping {[round(x, 3) for x in clipped]} vs none {[round(x, 3) for x in plain]}; "
        f"log10 ratio {ratio.describe('.2f')}",
    )

    # -- 3. larger with beta2 --------------------------------------------------------------------
    logs = {arm: [math.log10(largest_peak(by_arm[arm][s])) for s in SEEDS] for arm in NO_CLIP}
    means = {arm: spread(x).mean for arm, x in logs.items()}
    diff = spread(b - a for a, b in zip(logs["beta2_095"], logs["beta2_0999"]))
    v.check(
        "the largest rise grows with beta2 (mean log10 of it: 0.95 < 0.99 and 0.95 < 0.999; 0.999 - 0.95 "
        "clears the seed spread)",
        means["beta2_095"] < means["none"] and means["beta2_095"] < means["beta2_0999"] and diff.clears(+1),
        f"mean log10 largest rise {[round(means[a], 2) for a in NO_CLIP]} (beta2 0.95, 0.99, 0.999); "
        f"0.999 - 0.95: {diff.describe('.2f')}",
    )
    return v
