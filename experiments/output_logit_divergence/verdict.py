"""Verdict, protocol 2: output-logit divergence without weight decay (Wortsman et al. 2023, Sec. 3.1.2).

The paper's quantity is the gap between the logits and the log-probabilities, log Z (the
log-sum-exp of a position's logits, ``output/lse_mean``: its mean over positions): softmax is
invariant to a shift shared by all logits, so without weight decay or z-loss nothing pins log Z,
and late in training it drifts away; z-loss 1e-4 * log^2 Z pulls it to 0. (With log Z = 0 the
vocabulary-mean logit equals the mean log-probability, at most -ln V by Jensen: the mean logit
is not the quantity, and a z-loss run may have the more negative one.)

Per run, from the logged ``output/lse_mean``: ``start`` = log Z at the first logged step after
warmup (about ln V: the logits start near 0), ``end`` = its mean over the last 10% of the logged
steps; the drift is ``|end - start|``, how far log Z moved once training was under way (the
paper's logits go very negative; a move either way unpins log Z from the log-probabilities).
Effects are per seed and must clear their spread (proxy.analysis.Spread.clears: every seed with
the claimed sign, the mean beyond two standard errors). Criteria, at the top LR unless said:

1. No decay, no z-loss: log Z drifts at least 2 nats and ends at least 2 nats from 0 (per seed,
   clearing the spread).
2. The drift needs the high LR: it is larger at the top LR than at the lowest (paired by seed).
3. z-loss 1e-4 pins log Z: |end| <= 1 nat in every seed.
4. Coupled weight decay restrains it: the drift is smaller than without decay (paired by seed).

Mechanism, reported and not judged: the mean logit of never / rarely / frequently seen tokens
(``output/logit_mean_<class>``) and the norm of the LM head's mean row
(``output/mean_row_norm``) at the end of each arm.
"""

from __future__ import annotations

import math
from typing import Optional

from proxy import analysis, records
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict

LSE, ROW = records.OUTPUT_LSE_MEAN, records.OUTPUT_MEAN_ROW_NORM
CLASSES = ("never", "rare", "frequent")
ARMS = ("none", "z_loss", "coupled_wd")
DRIFT_NATS = 2.0
PINNED_NATS = 1.0


def _arm(run: Run) -> Optional[str]:
    return analysis.override_value(run.overrides, "output_arm")


def _seed(run: Run) -> int:
    seed = run.config_value("train.seed")
    return int(seed) if seed is not None else 0


def log_z(run: Run) -> tuple[float, float]:
    """(start, end): log Z at the first logged step after warmup, and over the last 10% of steps."""
    steps, values = run.series(LSE)
    pairs = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    if not pairs:
        return math.nan, math.nan
    warmup = run.config_value("schedule.warmup_steps") or 0
    after = [v for s, v in pairs if s >= warmup] or [pairs[-1][1]]
    tail = [v for s, v in pairs if s >= 0.9 * pairs[-1][0]]
    return after[0], sum(tail) / len(tail)


def drift(run: Run) -> float:
    start, end = log_z(run)
    return abs(end - start)


def _last(run: Run, key: str) -> float:
    values = [v for v in run.series(key)[1] if math.isfinite(v)]
    return values[-1] if values else math.nan


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(
        finding="Output logit divergence (protocol 2: log Z)", source="Wortsman et al. 2023, Sec. 3.1.2 (Fig. 8)"
    )
    by: dict[tuple[str, float], dict[int, Run]] = {}
    for run in runs:
        arm, lr = _arm(run), run.config_value("optim.lr")
        if arm in ARMS and lr is not None:
            by.setdefault((arm, float(lr)), {})[_seed(run)] = run
    lrs = sorted({lr for _, lr in by})
    missing = [arm for arm in ARMS if not any(a == arm for a, _ in by)]
    if missing or len(lrs) < 2:
        raise ValueError(f"need the arms {', '.join(ARMS)} at >= 2 LRs; missing arms {missing}, LRs {lrs}")
    top, low = lrs[-1], lrs[0]

    def paired(arm_a: str, lr_a: float, arm_b: str, lr_b: float, f) -> analysis.Spread:
        a, b = by.get((arm_a, lr_a), {}), by.get((arm_b, lr_b), {})
        return analysis.spread(f(a[s]) - f(b[s]) for s in sorted(set(a) & set(b)))

    none_top = list(by[("none", top)].values())
    d = analysis.spread(drift(r) for r in none_top)
    away = analysis.spread(abs(log_z(r)[1]) for r in none_top)
    v.check(
        f"no decay, no z-loss, LR {top:g}: log Z drifts >= {DRIFT_NATS:g} nats and ends >= {DRIFT_NATS:g} from 0",
        analysis.spread(min(x, y) - DRIFT_NATS for x, y in zip(d.values, away.values)).clears(+1),
        f"drift {d.describe()} nats; |log Z| at the end {away.describe()}",
    )
    lr_effect = paired("none", top, "none", low, drift)
    v.check(
        f"the drift is larger at LR {top:g} than at LR {low:g} (paired by seed)",
        lr_effect.clears(+1),
        f"difference {lr_effect.describe()} nats",
    )
    pinned = [abs(log_z(r)[1]) for r in by.get(("z_loss", top), {}).values()]
    v.check(
        f"z-loss 1e-4, LR {top:g}: |log Z| <= {PINNED_NATS:g} nat at the end in every seed",
        bool(pinned) and max(pinned) <= PINNED_NATS,
        f"|log Z| {analysis.spread(pinned).describe()}",
    )
    decay = paired("coupled_wd", top, "none", top, drift)
    v.check(
        f"coupled decay 0.1, LR {top:g}: the drift is smaller than without decay (paired by seed)",
        decay.clears(-1),
        f"difference {decay.describe()} nats",
    )

    for (arm, lr), seeds in sorted(by.items()):
        tag = f"{arm}/lr{lr:g}"
        v.numbers[f"log_z_start/{tag}"] = analysis.spread(log_z(r)[0] for r in seeds.values()).describe()
        v.numbers[f"log_z_end/{tag}"] = analysis.spread(log_z(r)[1] for r in seeds.values()).describe()
        for name in CLASSES:
            v.numbers[f"logit_mean_{name}/{tag}"] = analysis.spread(
                _last(r, records.OUTPUT_LOGIT_MEAN_BY_CLASS + name) for r in seeds.values()
            ).describe()
        v.numbers[f"mean_row_norm/{tag}"] = analysis.spread(_last(r, ROW) for r in seeds.values()).describe()
        v.numbers[f"final_val_loss/{tag}"] = analysis.spread(
            r.summary.final_val_loss or math.nan for r in seeds.values()
        ).describe()
    return v
