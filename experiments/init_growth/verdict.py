"""Verdict, protocol 2: OLMo 2's N(0, 0.02) init keeps the growth exponents steady across widths,
OLMo-0424's scaled init does not (OLMo 2, arXiv 2501.00656, §3.2).

The growth exponent lambda = (1/n_layers) * log(||v_last|| / ||v_first||) is measured at init by
``measure.py`` for every (layout, init, width, seed), with v_first the embedding output
(``embedding``) and the stream after the first block (``block1``). The paper's claim is about how
lambda scales with width, so the quantity judged is the **width slope** d lambda / d ln(d_model),
a least-squares fit over the measured widths, one per seed. Criteria, written before the run:

1. activations, OLMo 2 layout (reordered RMSNorm + QK-norm), v_first = embedding output: the
   scaled init's slope is steeper than the normal init's, |slope_scaled| - |slope_normal| > 0
   per seed (paired by seed index), clearing its spread (proxy.analysis.Spread.clears: every seed
   with that sign, the mean beyond 2 standard errors; needs >= 3 seeds);
2. the same for gradients.

Reported beside them, not judged: the same effect for v_first = block 1 (protocol 1's
definition) and for the pre-LN layout, and the mean lambda per width.

Training half (secondary, GPU scale): OLMo 2 counts grad-norm spikes with a 1000-step rolling
window (7 sigma). When the runs given to ``proxy-verdict`` logged more than 2000 grad-norm points
each (the window full for at least 1000 scored points), a third criterion: the grad-norm spike
score (7 sigma / 1000) is lower with init=normal than with init=scaled, averaged over LRs and
seeds. Shorter runs are reported and not judged: a 1000-step window cannot fill.

``measure.py`` writes ``growth_exponents_p2.csv`` and judges the at-init half itself;
``proxy-verdict experiments/init_growth RUN_DIRS --out DIR`` reads the CSV from DIR if present,
else from ``results/protocol2``. Protocol 1 (max |lambda| over widths, block-1 definition, lab
spike score) is ``protocol1/verdict.py``; its result stays in ``results/``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from proxy import records
from proxy.analysis import OLMO2_SPIKES, OLMO_CORE_SPIKES, Spread, spike_score, spread
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, load_script

HERE = Path(__file__).resolve().parent
CSV_NAME = "growth_exponents_p2.csv"
SOURCE = (
    "OLMo 2 (arXiv 2501.00656) §3.2: with N(0, 0.02) init the growth exponents of activations "
    "and gradients stay steady across widths; grad-norm spike score 0.40 -> 0.03"
)
JUDGED = ("olmo2", "embedding")  # (layout, v_first definition) the criteria are stated on
QUANTITIES = ("activation", "gradient")
MIN_TRAINING_POINTS = 2000  # 1000-step window + 1000 scored points


def _measure_module():
    """measure.py beside this file (experiments/ is not a package, so load it by path)."""
    return load_script(HERE / "measure.py")


def width_slope(widths: Iterable[int], values: Iterable[float]) -> float:
    """Least-squares slope of ``values`` against ln(width); NaN with fewer than 2 widths."""
    x, y = np.log(np.asarray(list(widths), dtype=float)), np.asarray(list(values), dtype=float)
    if len(set(x.tolist())) < 2:
        return math.nan
    return float(np.polyfit(x, y, 1)[0])


def slopes(samples: list, arch: str, definition: str, init: str, quantity: str) -> dict[int, float]:
    """Per seed: the width slope of lambda (``quantity``) for one layout, definition and init."""
    by_seed: dict[int, dict[int, float]] = {}
    for s in samples:
        if (s.arch, s.definition, s.init) == (arch, definition, init):
            by_seed.setdefault(s.seed, {})[s.width] = getattr(s, quantity)
    return {seed: width_slope(points, points.values()) for seed, points in sorted(by_seed.items())}


def flatness_effect(samples: list, arch: str, definition: str, quantity: str) -> Spread:
    """|slope_scaled| - |slope_normal| per seed present for both inits (> 0: normal is flatter)."""
    normal = slopes(samples, arch, definition, "normal", quantity)
    scaled = slopes(samples, arch, definition, "scaled", quantity)
    return spread(abs(scaled[s]) - abs(normal[s]) for s in sorted(set(normal) & set(scaled)))


def judge_at_init(samples: list, source: str = "") -> Verdict:
    """The at-init half: criteria 1-2 on ``JUDGED``, everything else as numbers."""
    verdict = Verdict(finding="init_growth", source=SOURCE)
    if source:
        verdict.numbers["growth/csv"] = source
    arch, definition = JUDGED
    for a in sorted({s.arch for s in samples}):
        for d in sorted({s.definition for s in samples}):
            for q in QUANTITIES:
                for init in ("normal", "scaled"):
                    per_seed = slopes(samples, a, d, init, q)
                    if per_seed:
                        verdict.numbers[f"slope/{a}/{d}/{q}/{init}"] = spread(per_seed.values()).describe(".4f")
                effect = flatness_effect(samples, a, d, q)
                if effect.n:
                    verdict.numbers[f"effect/{a}/{d}/{q}"] = effect.describe(".4f")
    widths = sorted({s.width for s in samples if (s.arch, s.definition) == JUDGED})
    for q in QUANTITIES:
        effect = flatness_effect(samples, arch, definition, q)
        normal = spread(slopes(samples, arch, definition, "normal", q).values())
        scaled = spread(slopes(samples, arch, definition, "scaled", q).values())
        span = f"widths {widths[0]}-{widths[-1]}" if widths else "no widths"
        verdict.check(
            f"at init ({arch}, v_first = {definition}, {span}): {q} growth exponent flatter across "
            f"widths with init=normal (|slope scaled| - |slope normal| > 0, clearing the seed spread)",
            len(widths) >= 3 and effect.clears(+1),
            f"dλ/d ln d: normal {normal.describe('.4f')}, scaled {scaled.describe('.4f')}; "
            f"effect {effect.describe('.4f')}",
        )
    return verdict


def _growth_csv(report: ReportResult) -> Optional[Path]:
    for candidate in (Path(report.out_dir) / CSV_NAME, HERE / "results" / "protocol2" / CSV_NAME):
        if candidate.is_file():
            return candidate
    return None


def _init_of(run: Run) -> Optional[str]:
    model: Any = run.config.get("model", {})
    return str(model.get("init")) if isinstance(model, dict) and model.get("init") is not None else None


def _judge_training(verdict: Verdict, runs: list[Run]) -> None:
    scores: dict[str, dict[str, list[float]]] = {}
    shortest: Optional[int] = None
    for run in runs:
        init, norms = _init_of(run), run.series(records.GRAD_NORM)[1]
        if init is None or not norms:
            continue
        shortest = len(norms) if shortest is None else min(shortest, len(norms))
        for name, options in (("olmo_core", OLMO_CORE_SPIKES), ("olmo2", OLMO2_SPIKES)):
            value = spike_score(norms, options)
            if value is not None:
                scores.setdefault(init, {}).setdefault(name, []).append(value)
    for init, by_detector in sorted(scores.items()):
        for name, values in by_detector.items():
            verdict.numbers[f"spike_score_grad_norm/{name}/{init}"] = statistics.fmean(values)
    if shortest is None:
        verdict.numbers["training"] = "no training runs with model.init and a logged grad norm: not judged"
        return
    verdict.numbers["training/shortest_run_points"] = shortest
    if shortest <= MIN_TRAINING_POINTS:
        verdict.numbers["training"] = (
            f"not judged: the shortest run logged {shortest} grad-norm points; "
            f"OLMo 2's 1000-step window needs more than {MIN_TRAINING_POINTS}"
        )
        return
    per_init = {
        init: statistics.fmean(scores.get(init, {}).get("olmo2", [])) if scores.get(init, {}).get("olmo2") else None
        for init in ("normal", "scaled")
    }
    if None in per_init.values():
        verdict.check("in training: runs with init=normal and init=scaled were scored", False, f"{per_init}")
        return
    verdict.check(
        "in training: grad-norm spike score (7σ/1000) lower with init=normal than scaled",
        per_init["normal"] < per_init["scaled"],
        f"{per_init['normal']:.3g}% normal vs {per_init['scaled']:.3g}% scaled (mean over runs)",
    )


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    path = _growth_csv(report)
    if path is None:
        verdict = Verdict(finding="init_growth", source=SOURCE)
        verdict.check(
            "growth exponents at init were measured",
            False,
            f"no {CSV_NAME}: run experiments/init_growth/measure.py first",
        )
    else:
        verdict = judge_at_init(_measure_module().read_samples(path), source=str(path))
    _judge_training(verdict, runs)
    return verdict
