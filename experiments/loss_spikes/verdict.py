"""Verdict: Adam's loss spikes in the low-noise phase (Wortsman et al. 2023b, arXiv 2304.13013;
Bai et al. 2025, arXiv 2506.04805), protocol 1 (experiments/loss_spikes/README.md), criteria
committed before the run.

Runs: conf/experiment/loss_spikes/lab.yaml, six arms (conf/loss_spike_arm/) x 3 seeds. A run's
**excursions** are what proxy/spikes.py's one definition finds on its ``probe/loss`` series (the
loss of one fixed held-out batch before every step's update): a **spike** rises past the trend/MAD
bar (6 sigma) and comes back under it within 100 steps, a **collapse** does not come back.

Design check (decided before any claim): in the ``none`` arm every seed reaches the low-noise phase,
its probe loss below ``LOW_NOISE`` nats, by step ``ONSET_BY``. Otherwise NOT TESTABLE AT THIS SCALE.

Criteria:

1. Spikes occur in every seed of the spiking arm (``none``, beta2 0.99): >= 1 spike per seed, and
   in every seed at least one spike whose peak is >= ``LARGE`` nats (a rise a practitioner sees).
2. Their rate grows with beta2: mean excursions per run ordered beta2 0.95 < 0.99 < 0.999, and the
   per-seed difference (0.999 minus 0.95, same seed) clears its spread (every seed positive, mean
   beyond 2 SE).
3. RMS_t > 1 precedes them: over the spikes of the three no-remedy arms (beta2 0.95 / 0.99 /
   0.999), the fraction f whose max-over-tensors RMS_t exceeds 1 at some step of the 8 before the
   spike's crossing (steps s-8 .. s-1) is >= 0.5, and the Wilson 95% lower bound of f is above g,
   the same fraction over every step after the low-noise onset of the same runs (the random-step
   control).
4. Update clipping removes them where gradient clipping does not: (a) the update_clip arm has
   fewer excursions than ``none`` in every seed and no spike or collapse peaking >= ``LARGE`` nats
   in any seed; (b) the grad_clip arm (global norm 1.0) has >= 1 excursion in every seed.
5. They are not a float32 artefact: the fp64 arm has >= 1 spike in every seed.

Reported, not judged: excursions per arm and seed with their steps and peaks, max RMS_t per arm,
the low-noise onset per run, RMS_t before each spike, the 95% t interval of each arm's mean count.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Optional, Sequence

from proxy.analysis import spread, wilson_interval
from proxy.records import ADAM_RMS_MAX, PROBE_LOSS, Run
from proxy.report import ReportResult
from proxy.spikes import LossSpike, loss_spikes
from proxy.verdict import Verdict

ARMS = ("none", "beta2_095", "beta2_0999", "update_clip", "grad_clip", "fp64")
NO_REMEDY = ("beta2_095", "none", "beta2_0999")  # beta2 0.95, 0.99, 0.999
LOW_NOISE = 0.01  # nats: the probe loss of the low-noise phase
ONSET_BY = 1000  # the design check: the none arm reaches the low-noise phase by this step
LARGE = 0.1  # nats: a spike's peak that counts as large in absolute terms
LEAD = 8  # RMS_t looked at in the 8 steps before a spike (Wortsman et al. 2023b: 1-8 steps)
SOURCE = (
    "Wortsman et al. 2023b (arXiv 2304.13013) section 3.4 and Bai et al. 2025 (arXiv 2506.04805): "
    "once g^2 << v_hat Adam's second moment is out of date, RMS_t = sqrt(mean(g^2/v_hat)) > 1 comes 1-8 "
    "steps before a loss spike, spikes grow with beta2, update clipping (StableAdamW) removes them and "
    "gradient clipping does not"
)


def arm_of(run: Run) -> Optional[str]:
    """The arm from what the run was trained with (its config), not from its directory name."""
    if run.config_value("train.dtype") == "fp64":
        return "fp64"
    if run.config_value("optim.update_clip"):
        return "update_clip"
    if (run.config_value("optim.grad_clip") or 0) > 0:
        return "grad_clip"
    return {0.95: "beta2_095", 0.99: "none", 0.999: "beta2_0999"}.get(run.config_value("optim.beta2"))


def runs_by_arm(
    runs: list[Run],
    arms: Sequence[str],
    seeds: Sequence[int],
    arm: Callable[[Run], Optional[str]] = arm_of,
    keep: Callable[[Run], bool] = lambda run: True,
) -> tuple[dict[str, dict[int, Run]], list[str]]:
    """{arm: {seed: run}} of the readable runs of ``arms`` x ``seeds`` (``keep``: which runs count),
    and the arms that lack a seed (protocols 3 on, and the clipping study's protocol 2)."""
    by_arm: dict[str, dict[int, Run]] = defaultdict(dict)
    for run in runs:
        name, seed = arm(run), run.config_value("train.seed")
        if name in arms and seed in seeds and run.error is None and keep(run):
            by_arm[name][int(seed)] = run
    return by_arm, [a for a in arms if sorted(by_arm.get(a, {})) != sorted(seeds)]


def excursions(run: Run) -> list[LossSpike]:
    steps, values = run.series(PROBE_LOSS)
    return loss_spikes(steps, values)


def onset(run: Run) -> Optional[int]:
    """The first step whose probe loss is below LOW_NOISE, or None."""
    steps, values = run.series(PROBE_LOSS)
    return next((s for s, v in zip(steps, values) if v < LOW_NOISE), None)


def rms_before(rms: dict[int, float], step: int) -> float:
    """The largest max-over-tensors RMS_t at steps step-LEAD .. step-1 (nan if none logged)."""
    found = [rms[s] for s in range(step - LEAD, step) if s in rms and math.isfinite(rms[s])]
    return max(found) if found else math.nan


def check_rms_before(
    v: Verdict,
    by_arm: dict[str, dict[int, Run]],
    picked: dict[tuple[str, int], list[LossSpike]],
    onsets: dict[str, dict[int, Optional[int]]],
    what: str,
) -> None:
    """The RMS_t criterion on the ``picked`` excursions of each (arm, seed): the fraction f with
    max RMS_t > 1 in the LEAD steps before the crossing is >= 0.5 and its Wilson 95% lower bound
    is above g, the same fraction over every probe step after the low-noise onset of those runs."""
    hits, total, control_hits, control_total = 0, 0, 0, 0
    before: dict[str, list[float]] = {}
    for (arm, s), events in picked.items():
        run = by_arm[arm][s]
        steps, values = run.series(ADAM_RMS_MAX)
        rms = dict(zip(steps, values))
        got = [rms_before(rms, e.step) for e in events]
        before[f"{arm}/{s}"] = [round(x, 2) for x in got]
        hits += sum(x > 1 for x in got)
        total += len(got)
        start = onsets[arm][s]
        if start is None:
            continue
        window = [rms_before(rms, p) for p in run.series(PROBE_LOSS)[0] if p > start + LEAD]
        control_hits += sum(x > 1 for x in window)
        control_total += len(window)
    f = hits / total if total else math.nan
    g = control_hits / control_total if control_total else math.nan
    low, high = wilson_interval(hits, total)
    v.numbers[f"rms_t_before_{what.replace(' ', '_')}"] = before
    v.check(
        f"RMS_t > 1 in the {LEAD} steps before most {what} (f >= 0.5), more often than before a random step "
        "(Wilson 95% lower bound of f > g)",
        total > 0 and f >= 0.5 and low > g,
        f"f = {hits}/{total} = {f:.2f} (95% [{low:.2f}, {high:.2f}]); random steps g = {control_hits}/"
        f"{control_total} = {g:.2f}",
    )


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="loss_spikes", source=SOURCE)
    by_arm: dict[str, dict[int, Run]] = defaultdict(dict)
    for run in runs:
        arm = arm_of(run)
        if arm is not None and run.error is None:
            by_arm[arm][int(run.config_value("train.seed") or 0)] = run
    missing = [a for a in ARMS if len(by_arm.get(a, {})) < 3]
    if missing:
        v.check(f"the sweep has every arm ({', '.join(ARMS)}) with >= 3 seeds", False, f"short: {missing}")
        return v
    found = {arm: {s: excursions(r) for s, r in seeds.items()} for arm, seeds in by_arm.items()}
    seeds = sorted(by_arm["none"])

    # -- reported numbers -----------------------------------------------------------------------
    for arm in ARMS:
        v.numbers[f"excursions/{arm}"] = spread(len(found[arm][s]) for s in seeds).describe(".2f")
        v.numbers[f"events/{arm}"] = {
            str(s): [f"{e.kind}@{e.step} peak {e.peak:.3g}" for e in found[arm][s]] for s in seeds
        }
        rms_max = [max(by_arm[arm][s].series(ADAM_RMS_MAX)[1], default=math.nan) for s in seeds]
        v.numbers[f"max_rms_t/{arm}"] = [round(x, 2) for x in rms_max]

    # -- design check: the low-noise phase is reached -------------------------------------------
    onsets = {arm: {s: onset(r) for s, r in runs_.items()} for arm, runs_ in by_arm.items()}
    v.numbers["low_noise_onset"] = {arm: {str(s): o for s, o in x.items()} for arm, x in onsets.items()}
    reached = [o is not None and o <= ONSET_BY for o in onsets["none"].values()]
    v.design(
        f"the spiking arm (beta2 0.99) reaches the low-noise phase (probe loss < {LOW_NOISE} nats) by step "
        f"{ONSET_BY} in every seed",
        all(reached),
        f"onset steps {list(onsets['none'].values())}",
        "a run long enough to reach the low-noise phase (more steps, or a larger batch so the gradient noise falls)",
    )

    if not v.testable:  # the claims are not judged on a run that could not show them
        return v

    # -- 1. spikes in every seed of the spiking arm -----------------------------------------------
    spikes_none = {s: [e for e in found["none"][s] if e.kind == "spike"] for s in seeds}
    large = {s: max((e.peak for e in xs), default=math.nan) for s, xs in spikes_none.items()}
    v.check(
        f"spikes (rise and recovery) in every seed of the spiking arm (beta2 0.99), at least one peaking >= {LARGE} "
        "nats in each",
        all(len(x) >= 1 for x in spikes_none.values()) and all(p >= LARGE for p in large.values()),
        f"spikes per seed {[len(x) for x in spikes_none.values()]}; largest peak per seed "
        f"{[round(p, 3) for p in large.values()]}",
    )

    # -- 2. rate grows with beta2 ---------------------------------------------------------------
    means = [spread(len(found[arm][s]) for s in seeds).mean for arm in NO_REMEDY]
    diff = spread(len(found["beta2_0999"][s]) - len(found["beta2_095"][s]) for s in seeds)
    v.check(
        "the rate of excursions grows with beta2 (mean 0.95 < 0.99 < 0.999; 0.999 - 0.95 clears the seed spread)",
        means[0] < means[1] < means[2] and diff.clears(+1),
        f"means {[round(m, 2) for m in means]}; 0.999 - 0.95: {diff.describe('.2f')}",
    )

    # -- 3. RMS_t > 1 precedes spikes, against every step as a control ----------------------------
    pick = {(arm, s): [e for e in found[arm][s] if e.kind == "spike"] for arm in NO_REMEDY for s in seeds}
    check_rms_before(v, by_arm, pick, onsets, "spikes")

    # -- 4. update clipping removes them, gradient clipping does not ------------------------------
    fewer = [len(found["update_clip"][s]) < len(found["none"][s]) for s in seeds]
    big_left = [e for s in seeds for e in found["update_clip"][s] if e.peak >= LARGE]
    v.check(
        f"update clipping (StableAdamW) removes them: fewer excursions than beta2 0.99 in every seed, none peaking "
        f">= {LARGE} nats",
        all(fewer) and not big_left,
        f"update_clip {[len(found['update_clip'][s]) for s in seeds]} vs none "
        f"{[len(found['none'][s]) for s in seeds]}; peaking >= {LARGE}: {len(big_left)}",
    )
    v.check(
        "gradient clipping (global norm 1.0) does not: >= 1 excursion in every seed",
        all(len(found["grad_clip"][s]) >= 1 for s in seeds),
        f"grad_clip {[len(found['grad_clip'][s]) for s in seeds]}",
    )

    # -- 5. not a float32 artefact --------------------------------------------------------------
    fp64 = [sum(e.kind == "spike" for e in found["fp64"][s]) for s in seeds]
    v.check(
        "the spikes are not a float32 artefact: >= 1 spike in every seed of the fp64 arm",
        all(n >= 1 for n in fp64),
        f"fp64 spikes per seed {fp64}",
    )
    return v
