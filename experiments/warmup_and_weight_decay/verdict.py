"""Verdict, protocol 2: longer warmup and independent weight decay lower LR sensitivity
(Wortsman et al. 2023, Sec. 3.2, Fig. 5 and 6), in the paper's recipe.

The paper measures these interventions on models that already have qk-layernorm and z-loss, so
attention-logit growth is not what fails; protocol 1 had QK-norm off, and there coupled decay's
LR-proportional shrink restrained the logit growth instead. Protocol 2: QK-norm + z-loss 1e-4
on, a 2 x 2 of warmup length (``schedule.warmup_steps``, short vs long) x decay form
(``+wd=coupled``: AdamW lambda 0.1, the decay per step proportional to the LR;
``+wd=independent``: lambda 1e-4, equal to coupled at LR 1e-3), each over an LR grid reaching
down to 1e-3 (where the two forms agree), every LR with several seeds.

LR sensitivity (Wortsman et al.: mean over the grid of min(final loss, loss at init) minus the
best loss) is computed per seed, from that seed's own LR curve (proxy.analysis.seed_curves);
effects are paired by seed and must clear their spread (proxy.analysis.Spread.clears: every
seed with the claimed sign, the mean beyond 2 standard errors; >= 3 seeds). Criteria, written
before the run:

1. The grid brackets the optimum: every (form, warmup, seed) curve has its best LR strictly
   inside the grid (else the grid must be widened; the sensitivities are not comparable).
2. Longer warmup lowers sensitivity, with either decay form: S(short) - S(long) > 0.
3. Independent decay lowers sensitivity, with either warmup: S(coupled) - S(independent) > 0.

Reported, not judged: the mean loss per LR of each arm, and the two forms' gap at the lowest LR.
"""

from __future__ import annotations

from typing import Optional

from proxy.analysis import SeedCurve, Spread, override_value, seed_curves, spread
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, check_grid_brackets, curve_points

FORMS = ("coupled", "independent")
SOURCE = (
    "Wortsman et al. 2023 (arXiv 2309.14322), Sec. 3.2 (Fig. 5, 6): longer warmup and independent decay "
    "lower LR sensitivity"
)


def _arm(run: Run) -> Optional[tuple[str, int]]:
    """(decay form, warmup steps) of a run, None when it is not part of the 2 x 2."""
    form, warmup = override_value(run.overrides, "wd"), run.config_value("schedule.warmup_steps")
    return (form, int(warmup)) if form in FORMS and warmup is not None else None


def paired(curves: dict, a: tuple[str, int], b: tuple[str, int]) -> Spread:
    """S(a) - S(b) per seed present in both arms."""
    left, right = curves.get(a, {}), curves.get(b, {})
    return spread(left[s].sensitivity - right[s].sensitivity for s in sorted(set(left) & set(right)))


def _mean_curve(seeds: dict[int, SeedCurve]) -> dict[float, float]:
    lrs = sorted({lr for c in seeds.values() for lr in c.curve})
    return {
        lr: sum(c.curve[lr] for c in seeds.values() if lr in c.curve) / sum(lr in c.curve for c in seeds.values())
        for lr in lrs
    }


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding="warmup_and_weight_decay", source=SOURCE)
    curves = seed_curves(curve_points(runs, _arm))
    warmups = sorted({w for _, w in curves})
    if set(f for f, _ in curves) != set(FORMS) or len(warmups) < 2:
        v.check("the sweep is +wd=coupled,independent x >= 2 warmup lengths", False, f"arms found: {sorted(curves)}")
        return v
    short, long = warmups[0], warmups[-1]
    for arm, seeds in sorted(curves.items()):
        label = f"{arm[0]}/warmup_{arm[1]}"
        v.numbers[f"lr_sensitivity/{label}"] = spread(c.sensitivity for c in seeds.values()).describe(".3f")
        v.numbers[f"loss_per_lr/{label}"] = {f"{lr:g}": round(x, 4) for lr, x in _mean_curve(seeds).items()}
        v.numbers[f"best_lr/{label}"] = sorted({f"{c.best_lr:g}" for c in seeds.values()})

    check_grid_brackets(v, curves, lambda arm: f"{arm[0]}/warmup {arm[1]}")
    for form in FORMS:
        effect = paired(curves, (form, short), (form, long))
        v.check(
            f"{form} decay: warmup {long} less LR-sensitive than warmup {short} (S short - S long > 0)",
            effect.clears(+1),
            effect.describe(".3f"),
        )
    for warmup in (short, long):
        effect = paired(curves, ("coupled", warmup), ("independent", warmup))
        v.check(
            f"warmup {warmup}: independent decay less LR-sensitive than coupled (S coupled - S independent > 0)",
            effect.clears(+1),
            effect.describe(".3f"),
        )
    lowest = min(lr for seeds in curves.values() for c in seeds.values() for lr in c.curve)
    for warmup in (short, long):
        gap = [
            curves[("coupled", warmup)][s].curve.get(lowest, float("nan"))
            - curves[("independent", warmup)][s].curve.get(lowest, float("nan"))
            for s in sorted(set(curves[("coupled", warmup)]) & set(curves[("independent", warmup)]))
        ]
        v.numbers[f"coupled_minus_independent_at_lr_{lowest:g}/warmup_{warmup}"] = spread(gap).describe(".3f")
    return v
