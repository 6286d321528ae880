"""Verdict, protocol 4: are the organism's loss spikes more frequent with a larger batch? (criteria
committed before the run; experiments/loss_spikes/README.md "Protocol 4").

Wortsman et al. 2023b (section 3.4) report loss spikes becoming more frequent with a larger batch as
with a larger beta2 and a larger model, and explain all three the same way: the less noise there
is in the gradient, the further Adam's second moment v_hat can fall behind it (RMS_t >> 1) once the
gradient grows again; Bai et al. 2025 put the low-noise phase first. Protocol 4 keeps protocol 2's
recipe and its spiking arm (the tiny model on the deterministic language, beta2 0.99, LR 1e-2
constant after 100 warm-up steps, no clipping, 2000 steps, the probe loss and RMS_t at every step)
and varies the batch: 4, 8 and 16 rows of 128 tokens (16 is the recipe's own;
conf/loss_spike_batch/), five fresh seeds (12-16) as one ensemble per batch size
(conf/experiment/loss_spikes/batch_lab.yaml). The probe is 16 held-out rows in every arm (16 / B
held-out batches), so the series the spikes are counted on has the same size everywhere; its rows
differ between arms (a held-out row is drawn by batch index and row), all from the same language.

A **large excursion** is an excursion of the committed spike definition (proxy/spikes.py, unchanged
since protocol 1) whose peak is >= 0.1 nats; a run's **largest rise** its largest probe loss from 20
steps after its low-noise onset on (protocol 2).

Design checks (decided before the claim; a failure gives NOT TESTABLE AT THIS SCALE):

a. every (batch, seed) run is there, readable, with the probe loss at every step;
b. the recipe's own batch (16 rows) reaches the low-noise phase (probe loss < 0.01 nats) by step
   1000 in every seed (protocols 1 and 2's check);
c. the recipe's own batch has a large excursion in >= 3 of the 5 seeds (the organism spikes, as in
   every seed of protocols 1 and 2).

Criterion (the paper's quantity, the frequency of loss spikes): per seed, the least-squares slope of
the number of large excursions against log2(batch rows) over 4, 8, 16 is > 0, clearing its spread
(:meth:`proxy.analysis.Spread.clears`: every seed positive, the mean beyond 2 standard errors).

Reported, not judged: per arm and seed the large excursions (step, peak), the number of all
excursions, the largest rise and its per-seed slope against log2(rows), the low-noise onset, the
largest RMS_t of the run and the RMS_t in the 8 steps before each large excursion (how often it is
> 1, against every step after the onset).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from proxy.analysis import spread, wilson_interval
from proxy.records import ADAM_RMS_MAX, PROBE_LOSS, Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, load_module

HERE = Path(__file__).resolve().parent
P1 = load_module(HERE.parent)  # arms, the excursions, the onset, RMS_t before a step
P2 = load_module(HERE.parent / "protocol2")  # the largest rise
ROWS = (4, 8, 16)
RECIPE_ROWS = 16
SEEDS = (12, 13, 14, 15, 16)
PROBE_ROWS = 16
LARGE = P1.LARGE
SPIKING_SEEDS = 3  # of 5: the design check on the recipe's own batch
SOURCE = (
    "Wortsman et al. 2023b (arXiv 2304.13013) section 3.4: loss spikes become more frequent with a larger batch "
    "(as with beta2 and model size): less gradient noise lets Adam's second moment fall further behind"
)
WOULD_TEST = (
    "a recipe whose own batch spikes in most seeds (protocol 2's did in 3 of 3): more steps, or the 20m model on "
    "a GPU (protocol 3)"
)


def rows_of(run: Run) -> Optional[int]:
    rows = run.config_value("train.batch_size")
    return int(rows) if isinstance(rows, int) and rows in ROWS else None


def _slope(x: list[float], y: list[float]) -> float:
    return round(float(np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)[0]), 9)  # no float dust


def judge(report: Optional[ReportResult], runs: list[Run]) -> Verdict:
    v = Verdict(finding="Loss spikes grow more frequent with the batch (protocol 4)", source=SOURCE)
    by_rows: dict[int, dict[int, Run]] = {}
    for run in runs:
        rows, seed = rows_of(run), run.config_value("train.seed")
        if rows is not None and seed in SEEDS and run.error is None and P1.arm_of(run) == "none":
            by_rows.setdefault(rows, {})[int(seed)] = run

    # a. the sweep is whole
    missing = [f"{r} rows/seed {s}" for r in ROWS for s in SEEDS if s not in by_rows.get(r, {})]
    every_step = [
        f"{r} rows/seed {s}"
        for r, seeds in by_rows.items()
        for s, run in seeds.items()
        if len(run.series(PROBE_LOSS)[0]) < int(run.config_value("train.steps") or 0)
    ]
    probe_rows = sorted(
        {
            int(run.config_value("train.batch_size") or 0) * int(run.config_value("train.probe_batches") or 0)
            for seeds in by_rows.values()
            for run in seeds.values()
        }
    )
    v.design(
        f"the sweep is whole: batch {'/'.join(map(str, ROWS))} rows x seeds {', '.join(map(str, SEEDS))}, beta2 0.99, "
        f"the probe loss at every step on {PROBE_ROWS} rows",
        not missing and not every_step and probe_rows == [PROBE_ROWS],
        f"{sum(len(s) for s in by_rows.values())} runs; probe rows {probe_rows}"
        + (f"; missing: {', '.join(missing[:5])}" if missing else "")
        + (f"; probe not at every step: {', '.join(every_step[:5])}" if every_step else ""),
        WOULD_TEST,
    )
    if missing:
        return v
    found = {r: {s: P1.excursions(run) for s, run in seeds.items()} for r, seeds in by_rows.items()}
    large = {r: {s: [e for e in xs if e.peak >= LARGE] for s, xs in per.items()} for r, per in found.items()}
    onsets = {r: {s: P1.onset(run) for s, run in seeds.items()} for r, seeds in by_rows.items()}
    rises = {r: {s: P2.largest_peak(run) for s, run in seeds.items()} for r, seeds in by_rows.items()}

    # b. the recipe's batch reaches the low-noise phase; c. and spikes
    recipe = onsets[RECIPE_ROWS]
    v.design(
        f"the recipe's own batch ({RECIPE_ROWS} rows) reaches the low-noise phase (probe loss < {P1.LOW_NOISE} nats) "
        f"by step {P1.ONSET_BY} in every seed",
        all(o is not None and o <= P1.ONSET_BY for o in recipe.values()),
        f"onset steps {[recipe[s] for s in SEEDS]}",
        WOULD_TEST,
    )
    spiking = [s for s in SEEDS if large[RECIPE_ROWS][s]]
    v.design(
        f"the recipe's own batch has a large excursion (peak >= {LARGE} nats) in >= {SPIKING_SEEDS} of "
        f"{len(SEEDS)} seeds",
        len(spiking) >= SPIKING_SEEDS,
        f"seeds with one: {spiking}",
        WOULD_TEST,
    )

    # reported, not judged
    for r in ROWS:
        v.numbers[f"large_excursions/{r}_rows"] = {
            str(s): [f"{e.kind}@{e.step} peak {e.peak:.3g}" for e in large[r][s]] for s in SEEDS
        }
        v.numbers[f"large_excursions_per_run/{r}_rows"] = spread(len(large[r][s]) for s in SEEDS).describe(".2f")
        v.numbers[f"excursions_per_run/{r}_rows"] = spread(len(found[r][s]) for s in SEEDS).describe(".2f")
        v.numbers[f"largest_rise_nats/{r}_rows"] = [round(rises[r][s], 4) for s in SEEDS]
        v.numbers[f"low_noise_onset/{r}_rows"] = [onsets[r][s] for s in SEEDS]
        v.numbers[f"max_rms_t/{r}_rows"] = [
            round(max(by_rows[r][s].series(ADAM_RMS_MAX)[1], default=math.nan), 2) for s in SEEDS
        ]
    x = [math.log2(r) for r in ROWS]
    logs = {s: [math.log10(rises[r][s]) if rises[r][s] > 0 else math.nan for r in ROWS] for s in SEEDS}
    rise_slopes = spread(_slope(x, logs[s]) for s in SEEDS if all(math.isfinite(y) for y in logs[s]))
    v.numbers["largest_rise_slope (log10 nats per doubling of the batch)"] = rise_slopes.describe(".3f")
    _rms_before(v, by_rows, large, onsets)

    if not v.testable:
        return v

    # the criterion: large excursions are more frequent with a larger batch
    slopes = spread(_slope(x, [len(large[r][s]) for r in ROWS]) for s in SEEDS)
    v.numbers["per_seed_slope (large excursions per doubling of the batch)"] = list(slopes.values)
    means = [spread(len(large[r][s]) for s in SEEDS).mean for r in ROWS]
    v.check(
        "large loss spikes are more frequent with a larger batch: the per-seed slope of the number of large "
        "excursions against log2(batch rows) over 4, 8, 16 clears its spread (> 0)",
        slopes.clears(+1),
        f"slope {slopes.describe('.3f')} per doubling; mean large excursions per run "
        + ", ".join(f"{r} rows {m:.2f}" for r, m in zip(ROWS, means)),
    )
    return v


def _rms_before(v: Verdict, by_rows: dict[int, dict[int, Run]], large: dict, onsets: dict) -> None:
    """Reported: how often RMS_t > 1 in the 8 steps before a large excursion, against every step
    after the onset (protocol 2's criterion 1, here not judged)."""
    hits = total = control_hits = control_total = 0
    for r, seeds in by_rows.items():
        for s, run in seeds.items():
            rms = dict(zip(*run.series(ADAM_RMS_MAX)))
            got = [P1.rms_before(rms, e.step) for e in large[r][s]]
            hits += sum(x > 1 for x in got)
            total += len(got)
            start = onsets[r][s]
            if start is not None:
                window = [P1.rms_before(rms, p) for p in run.series(PROBE_LOSS)[0] if p > start + P1.LEAD]
                control_hits += sum(x > 1 for x in window)
                control_total += len(window)
    low, high = wilson_interval(hits, total)
    v.numbers["rms_t_gt_1_before_large_excursions"] = (
        f"{hits}/{total} (95% [{low:.2f}, {high:.2f}]); every step after the onset: {control_hits}/{control_total}"
    )
