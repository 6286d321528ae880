"""Verdict, protocol 1 (superseded by ../verdict.py, kept runnable beside it): OLMo 2's N(0, 0.02)
init keeps growth exponents near 0 and lowers grad-norm spikes compared with OLMo-0424's scaled
init (OLMo 2 §3.2).

Two halves:

- At initialization (no training): protocol 1's ``measure.py`` wrote ``growth_exponents.csv``
  (lambda averaged over seeds, v_first = the stream after block 1); this judge reads it from the
  report directory if one is there, else from ``experiments/init_growth/results/`` (the committed
  protocol-1 result). Judged on OLMo 2's architecture (arch ``olmo2``: reordered RMSNorm +
  QK-norm) when measured, else on whatever arch the CSV holds.
  1. activations: max over widths of |lambda| is smaller for init=normal than for init=scaled;
  2. gradients: the same for the gradient growth exponent.
- In training (the sweep's runs, grouped by ``model.init``, LRs averaged):
  3. the grad-norm spike score (OLMo-core detector, 6 sigma above the mean of the previous 128
     values; OLMo 2's 7 sigma / 1000 is in ``numbers``) is lower for normal than for scaled.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from proxy import records
from proxy.analysis import OLMO2_SPIKES, OLMO_CORE_SPIKES, spike_score
from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict

RESULTS = Path(__file__).resolve().parents[1] / "results"
GRAD_NORM = records.GRAD_NORM


@dataclass
class GrowthRow:
    """One row of protocol 1's growth_exponents.csv."""

    arch: str
    init: str
    width: int
    activation: float  # mean over seeds of lambda for the residual stream
    gradient: float


def read_rows(path: Path) -> list[GrowthRow]:
    with path.open(newline="") as f:
        return [
            GrowthRow(
                arch=r["arch"],
                init=r["init"],
                width=int(r["width"]),
                activation=float(r["activation"]),
                gradient=float(r["gradient"]),
            )
            for r in csv.DictReader(f)
        ]


def _growth_csv(report: ReportResult) -> Optional[Path]:
    for candidate in (Path(report.out_dir) / "growth_exponents.csv", RESULTS / "growth_exponents.csv"):
        if candidate.is_file():
            return candidate
    return None


def _judge_growth(verdict: Verdict, report: ReportResult) -> None:
    path = _growth_csv(report)
    if path is None:
        verdict.check(
            "growth exponents at init were measured",
            False,
            "no growth_exponents.csv: protocol 1's measure.py output is missing",
        )
        return
    rows = read_rows(path)
    archs = {r.arch for r in rows}
    arch = "olmo2" if "olmo2" in archs else sorted(archs)[0]
    verdict.numbers["growth/csv"] = str(path)
    verdict.numbers["growth/arch_judged"] = arch
    for r in rows:
        verdict.numbers[f"growth/{r.arch}/{r.init}/d{r.width}"] = f"act {r.activation:+.4f}, grad {r.gradient:+.4f}"
    for key in ("activation", "gradient"):
        worst = {
            init: max((abs(getattr(r, key)) for r in rows if r.arch == arch and r.init == init), default=None)
            for init in ("normal", "scaled")
        }
        if None in worst.values():
            verdict.check(f"{key} growth measured for both inits ({arch})", False, f"max abs λ: {worst}")
            continue
        widths = sorted({r.width for r in rows if r.arch == arch})
        verdict.check(
            f"at init ({arch}, widths {widths[0]}-{widths[-1]}): {key} growth exponent nearer 0 with init=normal",
            worst["normal"] < worst["scaled"],
            f"max abs λ {worst['normal']:.3g} normal vs {worst['scaled']:.3g} scaled",
        )


def _mean(values: list[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def _init_of(run: Run) -> Optional[str]:
    model: Any = run.config.get("model", {})
    return str(model.get("init")) if isinstance(model, dict) and model.get("init") is not None else None


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    verdict = Verdict(
        finding="init_growth",
        source=(
            "OLMo 2 (arXiv 2501.00656) §3.2: N(0, 0.02) init keeps growth exponents near 0; "
            "grad-norm spike score 0.40 -> 0.03"
        ),
    )
    _judge_growth(verdict, report)

    scores: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        init, norms = _init_of(run), run.series(GRAD_NORM)[1]
        if init is None or not norms:
            continue
        for name, options in (("olmo_core", OLMO_CORE_SPIKES), ("olmo2", OLMO2_SPIKES)):
            value = spike_score(norms, options)
            if value is not None:
                scores.setdefault(init, {}).setdefault(name, []).append(value)
    for init, by_detector in sorted(scores.items()):
        for name, values in by_detector.items():
            verdict.numbers[f"spike_score_grad_norm/{name}/{init}"] = _mean(values)
    normal = _mean(scores.get("normal", {}).get("olmo_core", []))
    scaled = _mean(scores.get("scaled", {}).get("olmo_core", []))
    if normal is None or scaled is None:
        verdict.check(
            "training runs with init=normal and init=scaled logged the grad norm",
            False,
            f"inits found: {sorted(scores)}",
        )
    else:
        verdict.check(
            "in training: grad-norm spike score (6σ/128) lower with init=normal than scaled",
            normal < scaled,
            f"{normal:.3g}% normal vs {scaled:.3g}% scaled (mean over LRs)",
        )
    return verdict
