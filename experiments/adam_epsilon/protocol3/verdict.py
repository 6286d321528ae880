"""Verdict, protocol 3: protocol 2's criteria (experiments/adam_epsilon/verdict.py, unchanged) on five
fresh seeds (issue 31, item 5; experiments/adam_epsilon/README.md "Protocol 3").

Protocol 2 judged on seeds 0-2: the gradient RMS falls with width (slope -1.82 +- 0.06) and the
update shrink from eps 1e-6 grows with width (+0.46 +- 0.04), but the loss test was under-powered:
the penalty's growth from d64 to d256 was +0.319 +- 0.459 nats (sd over 3 seeds, t ~ 1.2), one
seed's d256 eps-1e-6 run ending far above the others. Protocol 3 reruns the same sweep
(`+experiment=adam_epsilon/lab 'sweep.seeds=[3,4,5,6,7]'`) on seeds no earlier run has seen and
judges protocol 2's three criteria as they are, with their bounds (0.05 for the shrink, 0.02 nats
for the penalty: a minimum size for the effect, not a tolerance), and one check that the five seeds
are there.

Power, stated before the run: if the penalty's spread over seeds is protocol 2's (sd 0.459 nats),
5 seeds put 2 SE at 0.41 nats, so the criterion passes only if the mean growth is near 0.4 nats or
the spread is smaller than protocol 2's; a NOT REPRODUCED on the penalty with a mean near
protocol 2's would say the lab's loss test cannot resolve the effect, not that it is absent.
Reported beside the criteria: the penalty per width and seed, how many seeds have it positive, and
each effect's 95 % t interval (``Spread.describe``).
"""

from __future__ import annotations

from pathlib import Path

from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, load_module

P2 = load_module(Path(__file__).resolve().parents[1])  # protocol 2: the criteria, unchanged
SEEDS = (3, 4, 5, 6, 7)


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = P2.judge(report, runs)
    v.finding = "adam_epsilon (protocol 3: protocol 2's criteria on 5 fresh seeds)"
    cells = P2.Cells(runs)
    seeds = cells.seeds(P2.SMALL, P2.LARGE)
    v.check(
        f"the sweep has seeds {', '.join(map(str, SEEDS))} at every width for both eps",
        set(SEEDS) <= set(seeds),
        f"seeds paired at every width: {seeds}",
    )
    widths = cells.widths
    if len(widths) >= 2 and seeds:
        for w in widths:
            per_seed = [P2._penalty(cells.loss, w, s) for s in seeds]
            v.numbers[f"loss_penalty/d{w} per seed (nats)"] = [round(x, 4) for x in per_seed]
        growth = cells.widest_minus_narrowest(cells.loss, P2._penalty, seeds)
        v.numbers[f"penalty growth d{widths[-1]} minus d{widths[0]}, seeds positive"] = (
            f"{sum(x > 0 for x in growth.values)} of {growth.n}"
        )
    return v
