"""Verdict, protocol 3: the lab's loss spikes one step up in size, on a GPU (criteria committed before
the run; experiments/loss_spikes/README.md "Protocol 3").

Wortsman et al. 2023b report loss spikes growing more frequent with model size, each preceded by
RMS_t >> 1, and update clipping removing them. Protocols 1 and 2 made them on the tiny model (d 64)
on a CPU. Protocol 3 trains the same recipe on the 20m model (d 512, 6 layers) in float32 for 1000
steps (conf/experiment/loss_spikes/lease.yaml), seeds 3, 4, 5 as protocol 2, arms none and
update_clip, and holds its none arm against protocol 2's tiny none arm as committed
(``results/protocol2/verdict.json``: the same recipe, seeds, data stream and spike definition), counted
over the same steps (< ``STEPS``). A **large excursion** peaks at >= 0.1 nats (protocols 1 and 2).

Design check (decided before any claim): the none arm reaches the low-noise phase (probe loss
< 0.01 nats) by step ``ONSET_BY`` = 500 in every seed; otherwise NOT TESTABLE AT THIS SCALE.

Criteria:

1. Larger models spike more: the mean number of large excursions per run of the none arm in steps
   < 1000 is higher at 20m than at tiny, and the difference clears its spread (beyond 2 standard
   errors, Welch: both seed sets' variances).
2. RMS_t > 1 precedes them at 20m: over the large excursions of both arms, the fraction f with
   max RMS_t > 1 at some step of the 8 before the crossing is >= 0.5 and its Wilson 95% lower bound
   is above g, the same fraction over every probe step after the low-noise onset (protocol 2's
   criterion 1).
3. Update clipping shrinks them at 20m: in every seed the largest rise with update clipping is below
   the none arm's (protocol 2's criterion 2; the largest rise is the largest probe loss from 20
   steps after the low-noise onset on).

Reported, not judged: every excursion with its step and peak, the largest rise per arm and seed
beside tiny's, max RMS_t, the low-noise onsets.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from proxy.analysis import spread
from proxy.records import ADAM_RMS_MAX, Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, load_module

HERE = Path(__file__).resolve().parent
P1 = load_module(HERE.parent)  # arms, definitions, the RMS_t criterion
P2 = load_module(HERE.parent / "protocol2")  # the largest rise
TINY = HERE.parent / "results" / "protocol2" / "verdict.json"  # protocol 2's committed tiny runs
ARMS = ("none", "update_clip")
SEEDS = P2.SEEDS
MODEL = "20m"
STEPS = 1000  # counted over steps < STEPS, in both sizes
ONSET_BY = 500
LARGE = P1.LARGE
SOURCE = (
    "Wortsman et al. 2023b (arXiv 2304.13013) section 3.4: loss spikes become more frequent with model size; "
    "RMS_t = sqrt(mean(g^2/v_hat)) > 1 precedes them; update clipping (StableAdamW) removes them"
)
EVENT = re.compile(r"^(spike|collapse)@(\d+) peak (\S+)$")


def tiny_large_excursions(path: Path = TINY) -> dict[int, int]:
    """Per seed, protocol 2's none-arm excursions peaking >= LARGE at steps < STEPS, read from its
    committed verdict (``events/none``: 'spike@295 peak 1.64', peaks to 3 significant digits)."""
    events = json.loads(path.read_text())["numbers"]["events/none"]
    counts = {}
    for seed, rows in events.items():
        parsed = [EVENT.match(row) for row in rows]
        if not all(parsed):
            raise ValueError(f"{path}: an event of seed {seed} is not 'kind@step peak value': {rows}")
        counts[int(seed)] = sum(
            1 for m in parsed if m is not None and int(m.group(2)) < STEPS and float(m.group(3)) >= LARGE
        )
    return counts


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="loss_spikes/protocol3", source=SOURCE)
    by_arm, missing = P1.runs_by_arm(runs, ARMS, SEEDS, keep=lambda run: run.config_value("model.name") == MODEL)
    if missing:
        v.check(f"the sweep has the {MODEL} arms {', '.join(ARMS)} with seeds {SEEDS}", False, f"short: {missing}")
        return v
    found = {
        arm: {s: [e for e in P1.excursions(r) if e.step < STEPS] for s, r in seeds.items()}
        for arm, seeds in by_arm.items()
    }
    tiny = tiny_large_excursions()
    tiny_rise = json.loads(TINY.read_text())["numbers"]["largest_rise/none"]
    for arm in ARMS:
        v.numbers[f"events/{arm}"] = {
            str(s): [f"{e.kind}@{e.step} peak {e.peak:.3g}" for e in found[arm][s]] for s in SEEDS
        }
        v.numbers[f"largest_rise/{arm}"] = [round(P2.largest_peak(by_arm[arm][s]), 4) for s in SEEDS]
        v.numbers[f"max_rms_t/{arm}"] = [
            round(max(by_arm[arm][s].series(ADAM_RMS_MAX)[1], default=math.nan), 2) for s in SEEDS
        ]
    v.numbers["tiny/large_excursions_none"] = [tiny[s] for s in SEEDS]
    v.numbers["tiny/largest_rise_none"] = tiny_rise

    onsets = {arm: {s: P1.onset(r) for s, r in seeds.items()} for arm, seeds in by_arm.items()}
    v.numbers["low_noise_onset"] = {arm: {str(s): o for s, o in x.items()} for arm, x in onsets.items()}
    v.design(
        f"the spiking arm (beta2 0.99) at {MODEL} reaches the low-noise phase (probe loss < {P1.LOW_NOISE} nats) "
        f"by step {ONSET_BY} in every seed",
        all(o is not None and o <= ONSET_BY for o in onsets["none"].values()),
        f"onset steps {list(onsets['none'].values())}",
        f"a {MODEL} run that reaches the low-noise phase: more steps, or the LR scaled to the width",
    )
    if not v.testable:
        return v

    # -- 1. larger models spike more --------------------------------------------------------------
    large = [sum(e.peak >= LARGE for e in found["none"][s]) for s in SEEDS]
    big, small = spread(large), spread(tiny[s] for s in SEEDS)
    se = math.sqrt(big.std**2 / big.n + small.std**2 / small.n)
    diff = big.mean - small.mean
    v.check(
        f"larger models spike more: large excursions per run (none arm, steps < {STEPS}) higher at {MODEL} than "
        "at tiny, beyond 2 standard errors",
        diff > 0 and diff > 2 * se,
        f"{MODEL} {large} (mean {big.mean:.2f}) vs tiny {[tiny[s] for s in SEEDS]} (mean {small.mean:.2f}); "
        f"difference {diff:+.2f}, SE {se:.2f}",
    )

    # -- 2. RMS_t > 1 before the large excursions -------------------------------------------------
    pick = {(arm, s): [e for e in found[arm][s] if e.peak >= LARGE] for arm in ARMS for s in SEEDS}
    P1.check_rms_before(v, by_arm, pick, onsets, "large excursions")

    # -- 3. update clipping shrinks them ----------------------------------------------------------
    clipped = [P2.largest_peak(by_arm["update_clip"][s]) for s in SEEDS]
    plain = [P2.largest_peak(by_arm["none"][s]) for s in SEEDS]
    v.check(
        "update clipping shrinks the largest rise: below the none arm's in every seed",
        all(c < p for c, p in zip(clipped, plain)),
        f"largest rise with update clipping {[round(x, 3) for x in clipped]} vs none {[round(x, 3) for x in plain]}",
    )
    return v
