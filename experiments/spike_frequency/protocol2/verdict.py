"""Verdict, spike frequency protocol 2: do larger models spike more often when every size trains at
its own LR? (OLMo 2, arXiv 2501.00656; issue 31 items 1 and 5.)

Protocol 1 (experiments/spike_frequency/verdict.py) ran every size at LR 3e-2, where the 1m and 5m
models without QK-norm collapsed toward the unigram entropy (final val loss 4.9-5.1 against 3.5
with QK-norm): "larger" also meant "more broken". Protocol 2 keeps protocol 1's recipe, conditions,
detectors and five criteria unchanged, and changes the design:

- each size at its own LR, chosen by a rule fixed before the bracket ran (choose_lrs.py: the lowest
  final val loss of a plain, seed-10 bracket over LR {1e-3, 3e-3, 1e-2, 3e-2}, strictly inside the
  grid), recorded in lrs.json; the same LR for the three conditions of a size;
- five fresh seeds (3-7); the ladder tiny (98.6k) -> 1m (1.18M) on the CPU, 5m and up left to the
  GPU queue (protocol 1's 5m jobs took 17-27 min each for 3 seeds).

Design checks, decided before the claim is judged (a failure gives NOT TESTABLE AT THIS SCALE):

a. every cell has seeds 3-7;
b. every size ran at the LR lrs.json chose for it;
c. every size trains at its LR: each plain run ends at least 1 nat below the language's unigram
   entropy (5.36 nats, the loss of a model that ignores context; protocol 1's collapsed runs ended
   at 4.9-5.1).

Then protocol 1's criteria 1-5, as they are (its own two design criteria included).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from proxy.analysis import override_value
from proxy.config import SyntheticConfig
from proxy.data import language_entropy
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, load_module

P1 = load_module(Path(__file__).resolve().parents[1])  # protocol 1: recipe, detectors, criteria
SEEDS = (3, 4, 5, 6, 7)
LRS_FILE = Path(__file__).resolve().parent / "lrs.json"
TRAINS_MARGIN = 1.0  # nats below the unigram entropy
WOULD_TEST = (
    "the same ladder with each size near its optimum: a bracket with a wider grid, or the GPU preset's "
    "5m -> 124m ladder with an LR bracket per size (~41 min on one H200 for 3 seeds at one LR)"
)


def chosen_lrs(path: Path = LRS_FILE) -> dict[str, float]:
    """size -> LR from lrs.json (empty when the bracket has not been chosen yet)."""
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text()).get("lr", {})
    return {str(k): float(v) for k, v in stored.items()}


def _range(values) -> str:
    numbers = [x for x in values if isinstance(x, (int, float))]
    return f"{min(numbers):.3f}-{max(numbers):.3f}" if numbers else "none"


def judge(report: Optional[ReportResult], runs: list[Run], lrs: Optional[dict[str, float]] = None) -> Verdict:
    lrs = chosen_lrs() if lrs is None else lrs
    p1 = P1.judge(report, runs)
    v = Verdict(
        finding="Spike frequency grows with model size (protocol 2: each size at its own LR, 5 fresh seeds)",
        source=p1.source,
    )
    v.numbers, v.notes, v.code = p1.numbers, p1.notes, p1.code
    studied = [r for r in runs if P1.condition_of(r) is not None]

    cells: dict[tuple[str, str], set[int]] = {}
    for r in studied:
        cells.setdefault((P1.condition_of(r), str(override_value(r.overrides, "model"))), set()).add(
            int(r.config_value("train.seed") or 0)
        )
    short = {f"{c}/{m}": sorted(s) for (c, m), s in sorted(cells.items()) if not set(SEEDS) <= s}
    v.design(
        f"every (condition, size) cell has seeds {', '.join(map(str, SEEDS))}",
        bool(cells) and not short,
        f"{len(cells)} cells" + (f"; short: {short}" if short else ", all seeds present"),
        WOULD_TEST,
    )
    off = sorted(
        {
            f"{override_value(r.overrides, 'model')} at {r.config_value('optim.lr')}"
            for r in studied
            if lrs.get(str(override_value(r.overrides, "model"))) is None
            or not math.isclose(float(r.config_value("optim.lr") or 0), lrs[str(override_value(r.overrides, "model"))])
        }
    )
    v.design(
        "every size ran at the LR the bracket chose for it (lrs.json)",
        bool(lrs) and bool(studied) and not off,
        f"chosen {lrs or 'none (no lrs.json)'}" + (f"; runs elsewhere: {off}" if off else ""),
        WOULD_TEST,
    )
    unigram = language_entropy(SyntheticConfig()).unigram_entropy
    bar = unigram - TRAINS_MARGIN
    plain = [r for r in studied if P1.condition_of(r) == "plain"]
    finals = {r.name: r.summary.final_val_loss for r in plain}
    failed = {n: x for n, x in finals.items() if not (isinstance(x, (int, float)) and x < bar)}
    v.design(
        f"every size trains at its LR: each plain run ends below {bar:.2f} nats "
        f"(the unigram entropy {unigram:.2f} minus {TRAINS_MARGIN:g})",
        bool(plain) and not failed,
        f"plain final val loss {_range(finals.values())}" + (f"; above the bar: {sorted(failed)}" if failed else ""),
        WOULD_TEST,
    )
    for c in p1.checks:
        v.check(c.claim, c.passed, c.measured)
    v.numbers["lr_per_size"] = lrs
    return v
