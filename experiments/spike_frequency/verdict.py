"""Verdict: do larger models spike more often? (OLMo 2, arXiv 2501.00656, observes that larger
models show loss and grad-norm spikes more often; whether a simplified setup shows it is open.)

The sweep (conf/experiment/spike_frequency/lab.yaml, gpu.yaml) crosses a size ladder (``model``)
with three conditions (``+spike_condition=plain|ngrams|qknorm``, conf/spike_condition/); every
(condition, size) job trains 3 seeds as one ensemble, on the same data stream, at one LR and for
the same number of steps, with the loss and the grad norm logged every step.

Spikes are counted on both series with both detectors of :mod:`proxy.analysis`, each with its
window full (a point is scored only once ``window`` finite points precede it):

- OLMo 2: >= 7 sigma from the mean of the previous 1000 points, either direction;
- OLMo-core: >= 6 sigma above the mean of the previous 128 points.

Both are scored on the same span, the steps from the longer window on (steps 1000-1999 in the lab
preset), so warm-up and the early fall of the loss are left out and the two counts cover the same
steps. A NaN/Inf is always a spike. The **rate** of a run is spikes per 1000 scored steps (OLMo 2's
spike score, % of points, times 10). The **size slope** of a condition is, per seed, the
least-squares slope of the rate against ln N (N: non-embedding parameters, from the run's summary)
over the ladder; its spread is over seeds (a seed is an init: every run sees the same batches).

The primary quantity is the grad-norm rate under OLMo 2's detector (the paper's score, on the
series OLMo 2 traces its spikes in); the loss and OLMo-core rates are reported beside it, not
judged. Criteria, written before the run (:meth:`proxy.analysis.Spread.clears`: every seed with
the claimed sign, the mean beyond 2 standard errors, >= 3 seeds):

1. Design, the windows filled: 3 conditions x >= 2 sizes x >= 3 seeds, loss and grad norm logged
   every step, and every run scored on >= 1000 steps by both detectors on both series.
2. Design, the detector can fire: at least one spike of the primary quantity in some run (else
   every slope is 0 by construction and says nothing about size).
3. Larger models spike more often, plain condition: the size slope clears its spread (> 0).
4. The same with planted repeated n-grams (ngrams condition).
5. QK-norm lowers the rate at the largest size: rate(plain) - rate(qknorm) at the largest size,
   paired by seed, clears its spread (> 0).

Either answer is a result: ``numbers["answer/<condition>"]`` says yes (grows), no (falls) or "no
growth shown" with the slope's upper bound, and ``numbers["what_would_settle_it/<condition>"]``
turns the measured spread into the scale that would settle it (seeds at this effect size, or the
GPU preset's wider ladder). ``judge`` takes a :class:`Protocol` so a test can run the same
verdict on a short run with short windows.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from proxy.analysis import (
    OLMO2_SPIKES,
    OLMO_CORE_SPIKES,
    SpikeOptions,
    Spread,
    detect_spikes,
    override_value,
    peak,
    spread,
)
from proxy.records import ATTN_MAX_LOGIT, COMPLETED, GRAD_NORM, STATUS_DIVERGED, TRAIN_LOSS, Run
from proxy.report import ReportResult
from proxy.verdict import Verdict

CONDITIONS = ("plain", "ngrams", "qknorm")
SERIES = {"grad_norm": GRAD_NORM, "loss": TRAIN_LOSS}
PRIMARY = ("grad_norm", "olmo2")
MIN_SEEDS = 3
MAX_SEEDS = 30  # what_would_settle_it: beyond this many seeds, more seeds is not the way to settle it
SOURCE = (
    "OLMo 2 (arXiv 2501.00656): larger models show loss and grad-norm spikes more often; spike score = % of "
    "points >= 7 sigma from the rolling mean of the previous 1000 (OLMo-core: 6 sigma above the last 128)"
)


def _full_window(options: SpikeOptions) -> SpikeOptions:
    """The detector as published: a point is scored only once its whole window precedes it."""
    return replace(options, min_history=options.window)


@dataclass(frozen=True)
class Protocol:
    """The detectors and how much of each run they must score (the lab and GPU presets: OLMo 2's
    and OLMo-core's detectors, 1000 scored steps)."""

    olmo2: SpikeOptions = field(default_factory=lambda: _full_window(OLMO2_SPIKES))
    olmo_core: SpikeOptions = field(default_factory=lambda: _full_window(OLMO_CORE_SPIKES))
    min_scored: int = 1000

    @property
    def detectors(self) -> dict[str, SpikeOptions]:
        return {"olmo2": self.olmo2, "olmo_core": self.olmo_core}

    @property
    def score_from(self) -> int:
        """The first scored step: both windows full."""
        return max(d.window for d in self.detectors.values())

    def describe(self) -> str:
        return (
            f"OLMo 2: {self.olmo2.describe()}; OLMo-core: {self.olmo_core.describe()}; scored from step "
            f"{self.score_from} on, >= {self.min_scored} scored steps per run"
        )


PROTOCOL = Protocol()


@dataclass
class RunSpikes:
    """One run's spike counts: (series, detector) -> spikes and scored steps."""

    run: Run
    condition: str
    size: tuple[int, int]  # (n_layers, d_model): one rung of the ladder in every condition
    n_params: int  # non-embedding, this condition's (qk-layernorm adds its gains)
    model: str
    seed: int
    spikes: dict[tuple[str, str], int]
    scored: dict[tuple[str, str], int]

    def rate(self, key: tuple[str, str] = PRIMARY) -> Optional[float]:
        """Spikes per 1000 scored steps; None when nothing was scored."""
        n = self.scored.get(key, 0)
        return 1000.0 * self.spikes[key] / n if n else None


def condition_of(run: Run) -> Optional[str]:
    value = override_value(run.overrides, "spike_condition")
    return value if value in CONDITIONS else None


def non_embedding_params(run: Run) -> Optional[int]:
    """From the run's summary (the model's own count), else 12 L d^2 from its config."""
    n = run.summary.n_params_non_embedding
    if isinstance(n, (int, float)) and n > 0:
        return int(n)
    layers, width = run.config_value("model.n_layers"), run.config_value("model.d_model")
    if isinstance(layers, int) and isinstance(width, int):
        return 12 * layers * width**2
    return None


def count_spikes(steps: list[int], values: list[float], options: SpikeOptions, score_from: int) -> tuple[int, int]:
    """(spikes, scored points) of one series: points the detector scores at step >= score_from."""
    if not values:
        return 0, 0
    found = detect_spikes(values, options)
    mask = found.scored & (np.asarray(steps) >= score_from)
    return int((found.is_spike & mask).sum()), int(mask.sum())


def score_run(run: Run, protocol: Protocol = PROTOCOL) -> Optional[RunSpikes]:
    """A run's counts, None when it is not part of the study (or did not finish: a crash is not
    a spike)."""
    condition, n = condition_of(run), non_embedding_params(run)
    layers, width = run.config_value("model.n_layers"), run.config_value("model.d_model")
    if (
        condition is None
        or n is None
        or not isinstance(layers, int)
        or not isinstance(width, int)
        or run.status not in (COMPLETED, STATUS_DIVERGED)
    ):
        return None
    spikes, scored = {}, {}
    for series, key in SERIES.items():
        steps, values = run.series(key)
        for name, options in protocol.detectors.items():
            spikes[series, name], scored[series, name] = count_spikes(steps, values, options, protocol.score_from)
    return RunSpikes(
        run,
        condition,
        (layers, width),
        n,
        str(run.config_value("model.name") or "?"),
        int(run.config_value("train.seed") or 0),
        spikes,
        scored,
    )


def _short(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def size_slopes(
    cells: dict[tuple[int, int], dict[int, RunSpikes]], key: tuple[str, str] = PRIMARY
) -> tuple[Spread, list[int]]:
    """Per seed: the least-squares slope of the rate against ln N over the sizes of ``cells``
    (size -> seed -> run); only seeds scored at every size. Returns the spread and the seeds."""
    sizes = list(cells)
    if len(sizes) < 2:
        return spread([]), []
    seeds = sorted(set.intersection(*(set(cells[n]) for n in sizes)))
    slopes, used = [], []
    x = np.log(np.asarray([statistics.median(r.n_params for r in cells[n].values()) for n in sizes], dtype=float))
    for seed in seeds:
        rates = [cells[n][seed].rate(key) for n in sizes]
        if any(r is None for r in rates):
            continue
        slopes.append(round(float(np.polyfit(x, np.asarray(rates, dtype=float), 1)[0]), 9))  # no float dust
        used.append(seed)
    return spread(slopes), used


def _rates(by_seed: dict[int, RunSpikes], key: tuple[str, str] = PRIMARY) -> Spread:
    return spread(r for s in by_seed.values() if (r := s.rate(key)) is not None)


def paired_difference(a: dict[int, RunSpikes], b: dict[int, RunSpikes], key: tuple[str, str] = PRIMARY) -> Spread:
    """rate(a) - rate(b) per seed scored in both."""
    values = []
    for seed in sorted(set(a) & set(b)):
        ra, rb = a[seed].rate(key), b[seed].rate(key)
        if ra is not None and rb is not None:
            values.append(ra - rb)
    return spread(values)


def answer(slope: Spread, design_ok: bool) -> str:
    """The measured answer to "do larger models spike more often?" for one condition."""
    if not design_ok or slope.n < MIN_SEEDS:
        return "cannot tell: the design check failed (see its row)"
    if slope.clears(+1):
        return f"yes: the rate grows with size ({slope.describe('.3g')} spikes/1000 steps per e-fold of N)"
    if slope.clears(-1):
        return f"no: the rate falls with size ({slope.describe('.3g')} per e-fold of N)"
    upper = slope.mean + 2 * slope.sem if math.isfinite(slope.sem) else slope.mean
    return f"no growth shown: slope {slope.describe('.3g')} per e-fold of N, upper bound (mean + 2 SE) {upper:.3g}"


def what_would_settle_it(slope: Spread, rates_all_zero: bool, span_ln: float, n_seeds: int = MIN_SEEDS) -> str:
    """One sentence: the scale (seeds, ladder, steps) that would settle the question for one
    condition, from the measured per-seed slopes."""
    gpu = (
        "the GPU preset (conf/experiment/spike_frequency/gpu.yaml: 5m -> 124m, 4000 scored steps "
        "per run) is the next test"
    )
    if rates_all_zero:
        return f"no spike was counted at any size, so this scale cannot tell; {gpu}."
    if slope.n < MIN_SEEDS or not math.isfinite(slope.std):
        return f"fewer than {MIN_SEEDS} seeds have a rate at every size; run the preset's seeds first."
    if slope.clears(+1) or slope.clears(-1):
        distance = (
            f"the mean is {abs(slope.mean) / slope.sem:.1f} SE from 0"
            if slope.sem > 0
            else "every seed gives the same slope"
        )
        return (
            f"settled on this ladder (e^{span_ln:.2f} = {math.exp(span_ln):.0f}x in N): every seed's slope has "
            f"the same sign and {distance}; {gpu} of whether it holds at larger N."
        )
    if slope.std == 0:  # and so the mean is 0: a nonzero slope in every seed clears
        return f"the rate does not change along this ladder (slope {slope.mean:.3g} in every seed); {gpu}."
    needed = max(MIN_SEEDS, math.floor((2 * slope.std / abs(slope.mean)) ** 2) + 1) if slope.mean else math.inf
    upper = slope.mean + 2 * slope.sem
    if slope.mean > 0 and needed <= MAX_SEEDS:
        return (
            f"at the measured effect ({slope.describe('.3g')} per e-fold of N) about {needed} seeds (now "
            f"{n_seeds}) would put the growth beyond 2 standard errors, if every seed kept its sign (about "
            f"{needed / max(n_seeds, 1):.1f}x the preset's cost); otherwise {gpu}."
        )
    if slope.mean < 0:
        why = "a falling slope that more seeds would not turn into growth" + (
            f" (about {needed} seeds would show the fall beyond 2 standard errors)" if needed <= MAX_SEEDS else ""
        )
    elif slope.mean == 0:
        why = "a slope of 0 on average, which more seeds would not turn into growth"
    else:
        why = f"growth this small would take about {needed} seeds to show"
    return (
        f"no growth on this ladder: slope {slope.describe('.3g')} per e-fold of N, growth above {upper:.3g} "
        f"excluded at 2 SE; {why}, so a wider ladder is the way to settle it: {gpu}."
    )


def judge(report: Optional[ReportResult], runs: list[Run], protocol: Protocol = PROTOCOL) -> Verdict:
    v = Verdict(finding="Spike frequency grows with model size", source=SOURCE)
    v.numbers["protocol"] = protocol.describe()
    scored = [s for s in (score_run(r, protocol) for r in runs) if s is not None]
    # the ladder: sizes ordered by their smallest non-embedding count (QK-norm adds a few gains)
    smallest = {}
    for s in scored:
        smallest[s.size] = min(smallest.get(s.size, s.n_params), s.n_params)
    sizes = sorted(smallest, key=smallest.get)
    cells: dict[str, dict[tuple[int, int], dict[int, RunSpikes]]] = {}
    for s in sorted(scored, key=lambda s: sizes.index(s.size)):
        cells.setdefault(s.condition, {}).setdefault(s.size, {})[s.seed] = s
    labels = {
        n: "/".join(sorted({s.model for s in scored if s.size == n})) + f" ({_short(smallest[n])})" for n in sizes
    }
    v.numbers["n_params_non_embedding"] = {
        f"{c}/{labels[n]}": sorted({s.n_params for s in by_seed.values()})[0]
        for c, by_size in sorted(cells.items())
        for n, by_seed in by_size.items()
    }
    skipped = [r.name for r in runs if condition_of(r) is not None and r.status not in (COMPLETED, STATUS_DIVERGED)]
    if skipped:
        v.numbers["runs_left_out (did not finish)"] = skipped
    v.numbers["diverged"] = [s.run.name for s in scored if s.run.status == STATUS_DIVERGED] or "none"

    # 1. design: the windows filled
    missing = [c for c in CONDITIONS if c not in cells]
    ladders = {c: list(cells.get(c, {})) for c in CONDITIONS}
    seeds = [len(by_seed) for c in cells.values() for by_seed in c.values()]
    log_every = sorted({r.run.config_value("train.log_every") for r in scored}, key=str)
    short = [
        f"{s.run.name} ({s.run.status}, {min(s.scored.values())} scored)"
        for s in scored
        if min(s.scored.values()) < protocol.min_scored
    ]
    scored_counts = [min(s.scored.values()) for s in scored]
    same_ladder = len({tuple(ladder) for ladder in ladders.values()}) == 1
    windows_ok = (
        not missing
        and same_ladder
        and all(len(ladders[c]) >= 2 for c in CONDITIONS)
        and bool(seeds)
        and min(seeds) >= MIN_SEEDS
        and log_every == [1]
        and not short
    )
    v.check(
        f"design: conditions {'/'.join(CONDITIONS)} x >= 2 sizes x >= {MIN_SEEDS} seeds, loss and grad norm "
        f"every step, every run scored on >= {protocol.min_scored} steps with both windows full",
        windows_ok,
        (f"missing conditions: {', '.join(missing)}; " if missing else "")
        + "sizes "
        + "; ".join(f"{c}: {', '.join(labels[n] for n in ladders[c]) or 'none'}" for c in CONDITIONS)
        + f"; seeds per cell {min(seeds, default=0)}-{max(seeds, default=0)}; log_every {log_every}"
        + f"; scored steps per run {min(scored_counts, default=0)}-{max(scored_counts, default=0)}"
        + (f"; short: {', '.join(short[:4])}{' ...' if len(short) > 4 else ''}" if short else ""),
    )

    # 2. design: the detector can fire
    totals = {
        f"{series}/{det}": sum(s.spikes[series, det] for s in scored) for series in SERIES for det in protocol.detectors
    }
    v.numbers["spikes_total"] = totals
    fired = totals["/".join(PRIMARY)] > 0
    v.check(
        "design: the detector can fire (>= 1 grad-norm spike under OLMo 2's detector in some run)",
        fired,
        "; ".join(f"{k}: {n} spikes" for k, n in totals.items()) + f" over {len(scored)} runs",
    )
    design_ok = windows_ok and fired

    # the numbers: rate per (condition, size), size slope per condition, for every series x detector
    for series in SERIES:
        for det in protocol.detectors:
            key = (series, det)
            v.numbers[f"spikes_per_1000_steps/{series}/{det}"] = {
                f"{c}/{labels[n]}": _rates(by_seed, key).describe(".3g")
                for c, by_size in sorted(cells.items())
                for n, by_seed in by_size.items()
            }
            slopes = {c: size_slopes(by_size, key)[0] for c, by_size in sorted(cells.items())}
            v.numbers[f"size_slope_per_ln_N/{series}/{det}"] = {
                c: sl.describe(".3g") + (" (clears > 0)" if sl.clears(+1) else " (clears < 0)" if sl.clears(-1) else "")
                for c, sl in slopes.items()
            }
    v.numbers["per_seed_size_slope/" + "/".join(PRIMARY)] = {
        c: [round(x, 4) for x in size_slopes(by_size)[0].values] for c, by_size in sorted(cells.items())
    }
    _context(v, cells, labels)

    # 3-4. the size criteria
    span = math.log(smallest[sizes[-1]] / smallest[sizes[0]]) if len(sizes) >= 2 else 0.0
    size_criteria(v, cells, labels, span, design_ok, fired, max(seeds, default=0))

    # 5. QK-norm at the largest size
    common = [n for n in sizes if n in cells.get("plain", {}) and n in cells.get("qknorm", {})]
    if common:
        top = common[-1]
        lower = paired_difference(cells["plain"][top], cells["qknorm"][top])
        others = {
            f"{series}/{det}": paired_difference(cells["plain"][top], cells["qknorm"][top], (series, det)).describe(
                ".3g"
            )
            for series in SERIES
            for det in protocol.detectors
        }
        v.numbers[f"plain_minus_qknorm_at_{labels[top]}"] = others
        v.check(
            f"QK-norm lowers the grad-norm spike rate (OLMo 2) at the largest size, {labels[top]} "
            f"(rate plain - rate qknorm > 0, paired by seed)",
            lower.clears(+1),
            f"{lower.describe('.3g')} spikes/1000 steps",
        )
    else:
        v.check(
            "QK-norm lowers the grad-norm spike rate (OLMo 2) at the largest size",
            False,
            "no size has both plain and qknorm runs",
        )
    v.notes = (
        "What scale would settle it: "
        + " ".join(f"{c}: {v.numbers[f'what_would_settle_it/{c}']}" for c in ("plain", "ngrams"))
        + " OLMo 2's observation is at 7B-32B parameters; a 'no' here bounds the effect on this ladder only."
    )
    return v


def size_criteria(
    v: Verdict,
    cells: dict[str, dict[tuple[int, int], dict[int, RunSpikes]]],
    labels: dict[tuple[int, int], str],
    span: float,
    design_ok: bool,
    fired: bool,
    n_seeds: int,
    where: str = "",
) -> None:
    """Criteria 3 and 4 (plain, ngrams): the per-seed size slope of the primary rate clears its
    spread (> 0); with each condition's answer and what would settle it. ``cells``: condition ->
    size -> seed -> run; ``where``: how the sizes were trained, in the claim ("at their own LR")."""
    for condition, what in (("plain", "plain data, no QK-norm"), ("ngrams", "with planted repeated n-grams")):
        by_size = cells.get(condition, {})
        slope, used = size_slopes(by_size)
        rates = {n: _rates(by_seed) for n, by_seed in by_size.items()}
        v.check(
            f"larger models spike more often{where} ({what}): the per-seed slope of the grad-norm spike rate "
            f"(OLMo 2) against ln N clears its spread (> 0)",
            slope.clears(+1),
            f"slope {slope.describe('.3g')} spikes/1000 steps per e-fold of N (seeds {used}); rates "
            + ", ".join(f"{labels[n]}: {r.describe('.3g')}" for n, r in rates.items()),
        )
        all_zero = all(s.rate() in (None, 0.0) for by_seed in by_size.values() for s in by_seed.values())
        v.numbers[f"answer/{condition}"] = answer(slope, design_ok)
        v.numbers[f"what_would_settle_it/{condition}"] = what_would_settle_it(
            slope, all_zero or not fired, span, n_seeds
        )


def _context(
    v: Verdict, cells: dict[str, dict[tuple[int, int], dict[int, RunSpikes]]], labels: dict[tuple[int, int], str]
) -> None:
    """Reported, not judged: final val loss and the peak max attention logit per (condition, size)
    (is the no-QK-norm ladder in the attention-logit-growth regime?)."""
    losses, logits = {}, {}
    for c, by_size in sorted(cells.items()):
        for n, by_seed in by_size.items():
            runs = [s.run for s in by_seed.values()]
            finals = [x for r in runs if (x := r.summary.final_val_loss) is not None]
            losses[f"{c}/{labels[n]}"] = spread(finals).describe(".4g")
            peaks = [p for r in runs if (p := peak(r.series(ATTN_MAX_LOGIT)[1])) is not None]
            logits[f"{c}/{labels[n]}"] = f"{statistics.median(peaks):.3g}" if peaks else "not logged"
    v.numbers["final_val_loss"] = losses
    v.numbers["peak_max_attention_logit (median over seeds)"] = logits
