"""Verdict, protocol 3: protocol 2's criteria (experiments/warmup_and_weight_decay/verdict.py,
unchanged) on five fresh seeds (issue 31, item 2; README "Protocol 3").

Protocol 2 (seeds 0-2) found independent decay less LR-sensitive than coupled at both warmups, but
at warmup 5 by 0.015 +- 0.011 nats against a 2 SE bar of 0.0127: a t > 2 test on 2 degrees of
freedom that a fourth seed could flip; longer warmup did not lower sensitivity (-0.027 +- 0.016
coupled, -0.001 +- 0.017 independent). Protocol 3 reruns the same 2 x 2 sweep
(`+experiment=warmup_and_weight_decay/lab 'sweep.seeds=[3,4,5,6,7]'`) on seeds no earlier run has
seen, judges protocol 2's five criteria as they are, and checks that the five seeds are there.

Power, stated before the run: at protocol 2's spread of the warmup-5 decay effect (sd 0.011), 2 SE
over 5 seeds is 0.010 nats, so an effect of protocol 2's size (0.015) passes if it is real and
every seed shows its sign. Reported beside the criteria: each paired effect per seed and how many
seeds have it positive, with the 95 % t interval of every effect (``Spread.describe``).
"""

from __future__ import annotations

from pathlib import Path

from proxy.analysis import seed_curves
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, check_seeds_in_every_curve, curve_points, load_module

P2 = load_module(Path(__file__).resolve().parents[1])  # protocol 2: the criteria, unchanged
SEEDS = (3, 4, 5, 6, 7)


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = P2.judge(report, runs)
    v.finding = "warmup_and_weight_decay (protocol 3: protocol 2's criteria on 5 fresh seeds)"
    curves = seed_curves(curve_points(runs, P2._arm))
    check_seeds_in_every_curve(v, curves, SEEDS, "(decay form, warmup) arm")
    warmups = sorted({w for _, w in curves})
    if len(warmups) < 2:
        return v
    short, long = warmups[0], warmups[-1]
    effects = {f"{form}: S(warmup {short}) - S(warmup {long})": ((form, short), (form, long)) for form in P2.FORMS}
    effects |= {f"warmup {w}: S(coupled) - S(independent)": (("coupled", w), ("independent", w)) for w in (short, long)}
    for label, (a, b) in effects.items():
        effect = P2.paired(curves, a, b)
        v.numbers[f"{label}, per seed"] = [round(x, 4) for x in effect.values]
        v.numbers[f"{label}, seeds positive"] = f"{sum(x > 0 for x in effect.values)} of {effect.n}"
    return v
