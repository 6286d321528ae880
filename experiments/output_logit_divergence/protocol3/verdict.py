"""Verdict, protocol 3: protocol 2's criteria (experiments/output_logit_divergence/verdict.py,
unchanged) behind a design check that decides, before any claim is judged, whether a run could
show the drift at all (issue 31; experiments/output_logit_divergence/README.md "Protocol 3").

Wortsman et al. (2023, Sec. 3.1.2, Fig. 8) see the output logits drift toward the end of 1e5-step
runs, from 2.4M non-embedding parameters up. Protocol 2's lab runs were 800 steps of a 99k-parameter
model: log Z still sat near its value at init (ln V = 8.3, the logits start near 0), so "ends >= 2
nats from 0" held by construction, and z-loss 1e-4 (a pull of ~2e-3 per token) had no time to move
it. A design that short cannot show the drift or z-loss's cure; it says NOT TESTABLE AT THIS SCALE
rather than NOT REPRODUCED.

Design checks, both read from the runs' configuration and summary (decidable before training):

1. the runs reach the phase the drift lives in: >= ``MIN_STEPS`` = 1e4 steps, a tenth of the
   paper's 1e5 (the drift appears toward their end);
2. the model is at least the paper's smallest drifting one: >= ``MIN_PARAMS`` = 2.4M non-embedding
   parameters.

If both hold, protocol 2's four criteria are judged as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from proxy.records import Run
from proxy.report import ReportResult
from proxy.verdict import Verdict, load_module

P2 = load_module(Path(__file__).resolve().parents[1])  # protocol 2: the criteria, unchanged
MIN_STEPS = 10_000
MIN_PARAMS = 2_400_000
FINDING = "Output logit divergence (protocol 3: protocol 2 behind a design check)"
SOURCE = "Wortsman et al. 2023, Sec. 3.1.2 (Fig. 8): the drift late in 1e5-step runs, from 2.4M parameters"
WOULD_TEST = (
    "a >= 2.4M-parameter model trained >= 1e4 steps (the paper: 1e5 steps, 32k vocabulary, LR 0.1) with a "
    "rare-token tail; the GPU preset output_logit_divergence/gpu (5m, 16k BPE, 15000 steps, ~46 min modelled "
    "on one H200) is the smallest such design here"
)


def _span(values: Sequence[int], unit: str) -> str:
    low, high = min(values, default=0), max(values, default=0)
    return f"{low:,} {unit}" if low == high else f"{low:,}-{high:,} {unit}"


def design(v: Verdict, steps: Sequence[int], params: Sequence[int]) -> bool:
    """The two design checks on the runs' planned steps and non-embedding parameter counts."""
    a = v.design(
        f"the runs reach the late phase the drift lives in: >= {MIN_STEPS:,} steps (a tenth of the paper's 1e5)",
        bool(steps) and min(steps) >= MIN_STEPS,
        _span(steps, "steps"),
        WOULD_TEST,
    )
    b = v.design(
        f"the model is at least the paper's smallest drifting one: >= {MIN_PARAMS / 1e6:.1f}M non-embedding parameters",
        bool(params) and min(params) >= MIN_PARAMS,
        _span(params, "non-embedding parameters"),
        "" if not a else WOULD_TEST,
    )
    return a and b


def judge(report: ReportResult, runs: list[Run]) -> Verdict:
    v = Verdict(finding=FINDING, source=SOURCE)
    steps = [int(r.config_value("train.steps") or 0) for r in runs]
    params = [int(r.summary.n_params_non_embedding or 0) for r in runs]
    if not design(v, steps, params):
        return v
    judged = P2.judge(report, runs)
    v.checks.extend(judged.checks)
    v.numbers.update(judged.numbers)
    return v
