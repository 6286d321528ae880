"""Verdicts: does a study reproduce the published finding? One answer with the numbers behind it.

Each folder under experiments/ holds a ``verdict.py`` with one function::

    def judge(report: ReportResult, runs: list[Run]) -> Verdict

that reads the report's numbers (LR sensitivity, statistics per run) and decides; it may also set
``REPORT_SPIKES`` (a :class:`proxy.analysis.SpikeOptions`), the spike detector of the report built
beside the verdict: its spike scores and the spikes its figures circle (default: OLMo 2's
7σ/1000, too long a window for a few-hundred-step study; marks leave warm-up out either way). The
command

    proxy-verdict experiments/attention_logit_growth runs/sweeps/<id> [more run dirs...]

collects the report for the run dirs (into ``<first path>/report``), calls the finding's judge,
writes the report with the verdict at its top (label, and each claim that fails or holds), prints
the verdict and writes ``verdict.md`` / ``verdict.json`` beside the report. Thresholds live
in each judge, stated in its docstring, so a NOT REPRODUCED is as readable as a REPRODUCED.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence

from proxy.analysis import CurvePoint
from proxy.records import (
    COMPLETED,
    STATUS_DIVERGED,
    Run,
    atomic_write_text,
    find_runs,
    load_run,
    terminal_block,
    terminal_text,
)
from proxy.report import Claim, VerdictSummary, collect_report, default_out_dir, write_report
from proxy.report.document import Block, Items, Paragraph, Table, to_markdown
from proxy.report.tables import code_commit, usable


@dataclass
class Check:
    """One criterion of a finding: what was expected, what was measured, whether it held."""

    claim: str
    measured: str
    passed: bool


NOT_TESTABLE = "NOT TESTABLE AT THIS SCALE"


@dataclass
class Verdict:
    """A finding judged by criteria committed before its run. Three outcomes: REPRODUCED (every
    check holds), NOT REPRODUCED, and NOT TESTABLE AT THIS SCALE: a design check (:meth:`design`)
    failed, so the run could not show the effect either way, and ``would_test`` says what
    would (scale, steps, compute). Design checks are decided before the claim is judged."""

    finding: str
    source: str  # the paper and section the claim comes from
    checks: list[Check] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    design_checks: list[Check] = field(default_factory=list)
    would_test: str = ""  # where a design check failed: the scale, steps and compute that would test it
    code: list[str] = field(default_factory=list)  # the commits the judged runs trained with (runs.csv code_commit)

    @property
    def testable(self) -> bool:
        return all(c.passed for c in self.design_checks)

    @property
    def reproduced(self) -> bool:
        return self.testable and bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def label(self) -> str:
        if not self.testable:
            return NOT_TESTABLE
        return "REPRODUCED" if self.reproduced else "NOT REPRODUCED"

    def design(self, claim: str, passed: bool, measured: str, would_test: str) -> bool:
        """A design check: can this run show the effect at all? If not, the verdict is NOT
        TESTABLE AT THIS SCALE and ``would_test`` says what would test it."""
        self.design_checks.append(Check(f"design: {claim}", measured, bool(passed)))
        if not passed:
            self.would_test = "; ".join(x for x in (self.would_test, would_test) if x)
        return bool(passed)

    def check(self, claim: str, passed: bool, measured: str) -> bool:
        self.checks.append(Check(claim, measured, bool(passed)))
        return bool(passed)

    def to_markdown(self) -> str:
        blocks: list[Block] = [
            Paragraph(f"Source: {self.source}"),
            Table(
                ["claim", "measured", "holds"],
                [[c.claim, c.measured, "yes" if c.passed else "no"] for c in [*self.design_checks, *self.checks]],
            ),
        ]
        if self.would_test:
            blocks.append(Paragraph(f"What would test it: {self.would_test}"))
        if self.numbers:
            blocks += [Paragraph("Numbers:"), Items([f"`{k}`: {_fmt(v)}" for k, v in self.numbers.items()])]
        if self.notes:
            blocks.append(Paragraph(self.notes))
        if self.code:
            blocks.append(Paragraph(f"Runs trained with proxy at: {', '.join(self.code)}"))
        return to_markdown(f"{self.finding}: **{self.label}**", blocks).rstrip("\n") + "\n"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "reproduced": self.reproduced, "label": self.label}

    def summary(self) -> VerdictSummary:
        """What the report shows at its top: the label and each claim."""
        return VerdictSummary(
            self.finding,
            self.label,
            tuple(Claim(c.claim, c.measured, c.passed) for c in [*self.design_checks, *self.checks]),
        )


def curve_points(runs: Sequence[Run], group: Callable[[Run], Optional[Hashable]]) -> list[CurvePoint]:
    """Each run as a point of an LR curve (:func:`proxy.analysis.seed_curves`): its group (None
    leaves the run out), ``train.seed``, ``optim.lr``, final val loss, loss at init and whether it
    diverged. Runs that did not finish (failed, interrupted, still running) and runs without an
    LR or a loss at init are left out: a crash is not a divergence."""
    points = []
    for run in runs:
        key, lr, init = group(run), run.config_value("optim.lr"), run.summary.loss_at_init
        if run.status not in (COMPLETED, STATUS_DIVERGED) or key is None:
            continue
        if not isinstance(lr, (int, float)) or not isinstance(init, (int, float)):
            continue
        loss = run.summary.final_val_loss
        points.append(
            CurvePoint(
                group=key,
                seed=int(run.config_value("train.seed") or 0),
                lr=float(lr),
                loss=float(loss) if isinstance(loss, (int, float)) else None,
                loss_at_init=float(init),
                diverged=run.status == STATUS_DIVERGED,
            )
        )
    return points


def unbracketed(curves: dict, name: Callable[[Any], str]) -> list[str]:
    """The (group, seed) curves of ``curves`` (:func:`proxy.analysis.seed_curves`) whose best LR
    sits on the grid's edge, each as "<name(group)>/seed <s> (best LR <lr>)"."""
    return [
        f"{name(group)}/seed {s} (best LR {c.best_lr:g})"
        for group, seeds in sorted(curves.items())
        for s, c in seeds.items()
        if not c.bracketed
    ]


def _record(verdict: "Verdict", claim: str, passed: bool, measured: str, would_test: Optional[str]) -> bool:
    """A criterion (``would_test`` None) or a design check (the scale that would test it)."""
    if would_test is None:
        return verdict.check(claim, passed, measured)
    return verdict.design(claim, passed, measured, would_test)


def check_grid_brackets(
    verdict: "Verdict", curves: dict, name: Callable[[Any], str], would_test: Optional[str] = None
) -> bool:
    """The check every LR-curve finding opens with: each (group, seed) curve of ``curves``
    (:func:`proxy.analysis.seed_curves`) has its best LR strictly inside the grid; ``name`` labels
    a group in the list of curves that do not. A criterion, or with ``would_test`` a design check."""
    outside = unbracketed(curves, name)
    lrs = sorted({lr for seeds in curves.values() for c in seeds.values() for lr in c.curve})
    return _record(
        verdict,
        f"the LR grid {lrs[0]:g}-{lrs[-1]:g} brackets every curve's optimum (best LR strictly inside)",
        not outside,
        "all inside" if not outside else "outside: " + "; ".join(outside[:6]),
        would_test,
    )


def check_seeds_in_every_curve(
    verdict: "Verdict", curves: dict, seeds: Sequence[int], curve: str, would_test: Optional[str] = None
) -> bool:
    """The check a rerun on fresh seeds adds: every group of ``curves`` (:func:`proxy.analysis.seed_curves`)
    has each of ``seeds``; ``curve`` names what a group is, e.g. "(decay form, warmup) arm". A
    criterion, or with ``would_test`` a design check."""
    found = sorted({s for per_seed in curves.values() for s in per_seed})
    return _record(
        verdict,
        f"the sweep has seeds {', '.join(map(str, seeds))} in every {curve}",
        bool(curves) and all(set(seeds) <= set(per_seed) for per_seed in curves.values()),
        f"seeds found: {found}",
        would_test,
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def load_judge(finding_dir: str | Path) -> Callable:
    return load_module(finding_dir).judge


def load_module(finding_dir: str | Path):
    """A finding's verdict.py as a module (its judge, constants and helpers, e.g. for a figure)."""
    path = Path(finding_dir) / "verdict.py"
    if not path.is_file():
        raise FileNotFoundError(f"no verdict.py in {finding_dir}")
    return load_script(path)


def load_script(path: str | Path):
    """A Python file of experiments/ (not a package) as a module, loaded once: named after its
    folder, the one above and its stem (protocol1/ sits in several findings), and registered
    before it runs, since a dataclass in it looks its module up in sys.modules."""
    path = Path(path).resolve()
    parts = [*path.parent.parts[-2:]] + ([] if path.stem == "verdict" else [path.stem])
    name = "proxy_verdict_" + re.sub(r"\W", "_", "_".join(parts))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None  # a .py file: the source file loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def judge_runs(
    finding_dir: str | Path, paths: Sequence[str | Path], out_dir: Optional[str | Path] = None, **report_options: Any
) -> Verdict:
    """Collect the report on ``paths``, judge, write the report headed by the verdict, and
    verdict.md/json beside it."""
    out = Path(out_dir) if out_dir else default_out_dir(paths[0])  # checked and made by collect_report
    module = load_module(finding_dir)
    if getattr(module, "REPORT_SPIKES", None) is not None:
        report_options.setdefault("spikes", module.REPORT_SPIKES)
    result = collect_report(list(paths), out, **report_options)
    runs = [usable(load_run(p)) for p in find_runs(paths)]  # as the report reads them: unusable is unreadable
    try:
        verdict: Verdict = module.judge(result, runs)
    except BaseException:
        write_report(result)  # the report still lands, without a verdict
        raise
    verdict.code = sorted({code_commit(run.summary.code) or "unrecorded" for run in runs})
    write_report(result, verdict.summary())
    atomic_write_text(out / "verdict.json", json.dumps(verdict.to_json(), indent=2, default=str) + "\n")
    atomic_write_text(out / "verdict.md", verdict.to_markdown())
    return verdict


def figure_inputs(
    doc: str, finding_dir: Path, argv: Optional[Sequence[str]] = None
) -> tuple[argparse.Namespace, Any, list[Run]]:
    """What a finding's figure script starts from: its command line (run dirs, ``--out``, default
    ``<finding>/results``), the finding's verdict module and the runs. FileNotFoundError for a
    path that does not exist."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="run directories or sweep directories")
    parser.add_argument("--out", type=Path, default=Path(finding_dir) / "results")
    args = parser.parse_args(argv)
    return args, load_module(finding_dir), [load_run(p) for p in find_runs(args.paths)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="proxy-verdict", description=__doc__.split("\n")[0])
    parser.add_argument("finding", help="an experiments/<finding> folder (holds verdict.py)")
    parser.add_argument("paths", nargs="+", help="run directories (single runs or sweep dirs)")
    parser.add_argument("--out", default=None, help="report directory (default: <first path>/report)")
    parser.add_argument(
        "--no-figures",
        action="store_true",
        help="tables and verdict only (the figures take most of a verdict's seconds; a GPU lease's science run "
        "leaves them to the CPU at home)",
    )
    args = parser.parse_args(argv)
    try:
        verdict = judge_runs(args.finding, args.paths, args.out, figures=not args.no_figures)
    except (OSError, ValueError) as exc:  # a missing path, a full disk, an output folder that is a link
        print(f"error: {terminal_text(exc)}", file=sys.stderr)
        return 2
    print(terminal_block(verdict.to_markdown()))
    return 0


__all__ = [
    "Check",
    "Run",
    "Verdict",
    "curve_points",
    "figure_inputs",
    "judge_runs",
    "load_judge",
    "load_module",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
