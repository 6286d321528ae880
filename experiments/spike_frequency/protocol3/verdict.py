"""Verdict, spike frequency protocol 3: do larger models spike more often when each size trains at
its own LR, one step up from the CPU ladder, on a GPU lease? (OLMo 2, arXiv 2501.00656; issue 31
item 5, issue 29's queue.)

Protocol 2 (protocol2/verdict.py) answered on the CPU ladder tiny (98.6k) -> 1m (1.18M), each size
at its own LR: no growth (plain +0.08 +- 0.44 spikes per 1000 steps per e-fold of N). Protocol 3
asks the same question at 5m (4.72M) -> 20m (18.9M), with a 16x larger batch (16 x 256 tokens),
on a GPU (conf/experiment/spike_frequency/lease.yaml). Everything else is the lab recipe: the
built-in language, 2000 steps, constant LR after 100 warm-up steps, the loss and grad norm logged
every step, protocol 1's detectors and scored span (steps 1000-1999).

The LR is chosen inside the same sweep: every (size, condition) job is one ensemble of LR
{3e-4, 1e-3, 3e-3, 1e-2} x seeds {3, 4, 5}. **Rule** (fixed here, before any run): per size, the
LR of the lowest mean final val loss over the seeds of its plain runs; a cell with a diverged or
non-finite run cannot be chosen; the same LR for both conditions of a size. Choosing by loss and
judging the spike rate keeps the choice blind to the claim.

Design checks, decided before the claim is judged (a failure gives NOT TESTABLE AT THIS SCALE):

a. the sweep is whole: conditions plain and ngrams x sizes 5m and 20m x the four LRs x seeds 3-5,
   loss and grad norm logged every step, every run at the chosen LRs scored on >= 1000 steps with
   both detectors' windows full (protocol 1's criterion 1 without its qknorm condition);
b. the grid brackets each size's optimum: the chosen LR lies strictly inside the grid;
c. every size trains at its LR: each plain run there ends at least 1 nat below the language's
   unigram entropy (protocol 2's check c);
d. the detector can fire: at least one grad-norm spike (OLMo 2's detector) among the runs at the
   chosen LRs (protocol 1's criterion 2; with none, every slope is 0 by construction and says
   nothing about size).

Criteria (protocol 1's 3 and 4, on the runs at the chosen LRs; :meth:`proxy.analysis.Spread.clears`:
every seed with the claimed sign, the mean beyond 2 standard errors):

1. Larger models spike more often, plain: the per-seed slope of the grad-norm spike rate (OLMo 2)
   against ln N is > 0, clearing its spread.
2. The same with planted repeated n-grams (ngrams).

Protocol 1's criterion 5 (QK-norm at the largest size) is not part of this protocol: at each size's
own LR protocol 2 found almost nothing for QK-norm to remove (+0.4 +- 0.9 at 1m), and a qknorm
condition would double the device time.

Reported, not judged: the chosen LRs with the mean final val loss per (size, LR); the spike rates
of every (condition, size, LR) cell, so the shared-LR view of protocol 1 stands beside the own-LR
one; the size slope at each grid LR; loss-series and OLMo-core rates; final val loss and the peak
attention logit per cell; and what would settle it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from proxy.analysis import best_is_inside, override_value
from proxy.config import SyntheticConfig
from proxy.data import language_entropy
from proxy.records import STATUS_DIVERGED, Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, load_module

P1 = load_module(Path(__file__).resolve().parents[1])  # protocol 1: detectors, scoring, slopes
CONDITIONS = ("plain", "ngrams")
SIZES = ("5m", "20m")
LRS = (3e-4, 1e-3, 3e-3, 1e-2)
SEEDS = (3, 4, 5)
TRAINS_MARGIN = 1.0  # nats below the unigram entropy
WOULD_TEST = (
    "each size near its own optimum with a grid that brackets it: the lease preset with the grid widened "
    "one step on the failing side (~3 min per job on an H100), or longer runs / larger sizes where no spike "
    "fires (the gpu preset's 5m -> 124m ladder, 4000 scored steps, ~41 min on one H200)"
)


def _lr(run: Run) -> Optional[float]:
    lr = run.config_value("optim.lr")
    return float(lr) if isinstance(lr, (int, float)) else None


def _size(run: Run) -> str:
    return str(override_value(run.overrides, "model") or run.config_value("model.name") or "?")


def _on_grid(lr: Optional[float]) -> Optional[float]:
    """The grid LR ``lr`` is (float noise from a config round trip forgiven), None when off it."""
    return next((g for g in LRS if lr is not None and math.isclose(lr, g, rel_tol=1e-6)), None)


def choose_lrs(runs: list[Run]) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """The rule: per size, the grid LR of the lowest mean final val loss of its plain runs (a cell
    with a diverged or non-finite run is not eligible). Returns (size -> chosen LR, size -> {LR:
    mean final val loss, inf where not eligible})."""
    finals: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        lr = _on_grid(_lr(r))
        if P1.condition_of(r) != "plain" or lr is None:
            continue
        loss = r.summary.final_val_loss
        ok = r.status != STATUS_DIVERGED and isinstance(loss, (int, float)) and math.isfinite(loss)
        finals.setdefault(_size(r), {}).setdefault(lr, []).append(float(loss) if ok else math.inf)
    curves = {
        size: {lr: (sum(xs) / len(xs) if all(math.isfinite(x) for x in xs) else math.inf) for lr, xs in by_lr.items()}
        for size, by_lr in finals.items()
    }
    chosen = {size: min(curve, key=curve.__getitem__) for size, curve in curves.items() if curve}
    return chosen, curves


def judge(report: Optional[ReportResult], runs: list[Run], protocol=None) -> Verdict:
    protocol = protocol or P1.PROTOCOL
    v = Verdict(
        finding="Spike frequency grows with model size (protocol 3: 5m -> 20m on a GPU, each size at its own LR)",
        source=P1.SOURCE,
    )
    v.numbers["protocol"] = protocol.describe()
    studied = [r for r in runs if P1.condition_of(r) in CONDITIONS]
    chosen, curves = choose_lrs(studied)
    v.numbers["rule"] = "per size, the LR of the lowest mean final val loss of its plain runs (seeds 3-5)"
    v.numbers["chosen_lr"] = {s: f"{lr:g}" for s, lr in sorted(chosen.items())}
    v.numbers["plain_mean_final_val_loss_by_lr"] = {
        s: {f"{lr:g}": (round(x, 4) if math.isfinite(x) else "diverged or non-finite") for lr, x in sorted(c.items())}
        for s, c in sorted(curves.items())
    }

    # a. the sweep is whole
    cells: dict[tuple[str, str, float], set[int]] = {}
    for r in studied:
        lr = _on_grid(_lr(r))
        if lr is not None:
            cells.setdefault((P1.condition_of(r), _size(r), lr), set()).add(int(r.config_value("train.seed") or 0))
    wanted = [(c, s, lr) for c in CONDITIONS for s in SIZES for lr in LRS]
    short = [f"{c}/{s}/lr {lr:g}: seeds {sorted(cells.get((c, s, lr), set()))}" for c, s, lr in wanted]
    short = [line for (c, s, lr), line in zip(wanted, short) if not set(SEEDS) <= cells.get((c, s, lr), set())]
    counted = {r.path: P1.score_run(r, protocol) for r in studied}  # the detectors run once per run
    at_chosen = [r for r in studied if _size(r) in chosen and _on_grid(_lr(r)) == chosen[_size(r)]]
    scored = [x for r in at_chosen if (x := counted[r.path]) is not None]
    log_every = sorted({r.config_value("train.log_every") for r in studied}, key=str)
    thin = [
        f"{x.run.name} ({min(x.scored.values())} scored)"
        for x in scored
        if min(x.scored.values()) < protocol.min_scored
    ]
    v.design(
        f"the sweep is whole: {'/'.join(CONDITIONS)} x {'/'.join(SIZES)} x LR {', '.join(f'{x:g}' for x in LRS)} x "
        f"seeds {', '.join(map(str, SEEDS))}, loss and grad norm every step, every run at the chosen LRs scored "
        f"on >= {protocol.min_scored} steps",
        not short and log_every == [1] and len(scored) == len(CONDITIONS) * len(SIZES) * len(SEEDS) and not thin,
        f"{len(cells)} of {len(wanted)} cells, {len(scored)} runs scored at the chosen LRs; log_every {log_every}"
        + (f"; incomplete: {'; '.join(short[:4])}{' ...' if len(short) > 4 else ''}" if short else "")
        + (f"; too few scored steps: {', '.join(thin[:4])}" if thin else ""),
        WOULD_TEST,
    )

    # b. the grid brackets each size's optimum
    edge = [f"{s} (best LR {chosen[s]:g})" for s in SIZES if s in curves and not best_is_inside(curves[s])]
    v.design(
        f"the LR grid {LRS[0]:g}-{LRS[-1]:g} brackets each size's optimum (the chosen LR strictly inside)",
        all(s in chosen for s in SIZES) and not edge,
        f"chosen {v.numbers['chosen_lr'] or 'none'}" + (f"; on the edge: {', '.join(edge)}" if edge else ""),
        WOULD_TEST,
    )

    # c. every size trains at its LR
    unigram = language_entropy(SyntheticConfig()).unigram_entropy
    bar = unigram - TRAINS_MARGIN
    plain = [x for x in scored if x.condition == "plain"]
    finals = {x.run.name: x.run.summary.final_val_loss for x in plain}
    above = sorted(n for n, f in finals.items() if not (isinstance(f, (int, float)) and f < bar))
    numbers = [f for f in finals.values() if isinstance(f, (int, float))]
    v.design(
        f"every size trains at its LR: each plain run there ends below {bar:.2f} nats "
        f"(the unigram entropy {unigram:.2f} minus {TRAINS_MARGIN:g})",
        bool(plain) and not above,
        (f"plain final val loss {min(numbers):.3f}-{max(numbers):.3f}" if numbers else "no plain runs")
        + (f"; above the bar: {above}" if above else ""),
        WOULD_TEST,
    )

    # d. the detector can fire
    totals = {
        f"{series}/{det}": sum(x.spikes[series, det] for x in scored)
        for series in P1.SERIES
        for det in protocol.detectors
    }
    v.numbers["spikes_total_at_chosen_lrs"] = totals
    fired = totals["/".join(P1.PRIMARY)] > 0
    v.design(
        "the detector can fire: >= 1 grad-norm spike under OLMo 2's detector among the runs at the chosen LRs",
        fired,
        "; ".join(f"{k}: {n}" for k, n in totals.items()) + f" over {len(scored)} runs",
        WOULD_TEST,
    )

    # the numbers: every (condition, size, LR) cell, so the shared-LR view stands beside the own-LR one
    by_cell: dict[tuple[str, str, float], dict[int, object]] = {}
    for r in studied:
        lr, x = _on_grid(_lr(r)), counted[r.path]
        if lr is not None and x is not None:
            by_cell.setdefault((x.condition, _size(r), lr), {})[x.seed] = x
    for series in P1.SERIES:
        for det in protocol.detectors:
            v.numbers[f"spikes_per_1000_steps/{series}/{det}"] = {
                f"{c}/{s}/lr {lr:g}" + (" (chosen)" if chosen.get(s) == lr else ""): P1._rates(
                    by_seed, (series, det)
                ).describe(".3g")
                for (c, s, lr), by_seed in sorted(by_cell.items())
            }
    v.numbers["size_slope_per_ln_N_at_each_shared_lr (reported, not judged)"] = {
        f"{c}/lr {lr:g}": P1.size_slopes({s: by_cell[c, s, lr] for s in SIZES if (c, s, lr) in by_cell})[0].describe(
            ".3g"
        )
        for c in CONDITIONS
        for lr in LRS
    }
    own: dict[str, dict[tuple[int, int], dict[int, object]]] = {}
    labels: dict[tuple[int, int], str] = {}
    for x in sorted(scored, key=lambda x: x.n_params):
        own.setdefault(x.condition, {}).setdefault(x.size, {})[x.seed] = x
        labels[x.size] = f"{_size(x.run)} at lr {chosen[_size(x.run)]:g}"
    P1._context(v, own, labels)

    # 1-2. the size criteria, at each size's own LR
    design_ok = v.testable
    params = sorted({x.n_params for x in scored if x.condition == "plain"})
    span = math.log(params[-1] / params[0]) if len(params) >= 2 else 0.0
    P1.size_criteria(v, own, labels, span, design_ok, fired, len(SEEDS), where=" at their own LR")
    v.numbers["per_seed_size_slope/" + "/".join(P1.PRIMARY)] = {
        c: [round(x, 4) for x in P1.size_slopes(by_size)[0].values] for c, by_size in sorted(own.items())
    }
    v.notes = (
        "Each size at the LR its plain runs train best at (chosen by loss, blind to the spike count). "
        "OLMo 2's observation is at 7B-32B parameters; a 'no' here bounds the effect on this ladder only."
    )
    return v
