"""``proxy-report``: run directories in, an instability report out.

    proxy-report runs/multirun/2026-01-01/12-00-00 [more paths...] [--out DIR]

writes ``report.html`` (self-contained: figures embedded as base64 PNG), ``report.md`` (linking
``figures/*.png``) and ``runs.csv`` into DIR (default: ``<first path>/report``). What goes in it:
the headline (proxy/report/headline.py) first, then the tables (proxy/report/tables.py) and the
figures (proxy/report/figures.py), laid out here as one document (proxy/report/document.py).

:func:`build_report` is :func:`collect_report` (read, tabulate, draw) then :func:`write_report`
(the documents); proxy-verdict judges in between, so the verdict heads the report it writes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from proxy import analysis
from proxy.analysis import SpikeOptions
from proxy.records import (
    COMPLETED,
    EVENT,
    FAILED,
    INTERRUPTED,
    RUNNING,
    STATUS_DIVERGED,
    STEP,
    UNKNOWN,
    UNREADABLE,
    atomic_write_text,
    find_runs,
    load_run,
    output_dir,
    terminal_text,
)
from proxy.report.document import Block, Figure, Heading, Items, Paragraph, Table, fmt, to_html, to_markdown
from proxy.report.figures import CAPTIONS, SpikeMarks, draw_figures
from proxy.report.headline import Headline, VerdictSummary, headline_of
from proxy.report.tables import SINGLE_LR_NOTE, RunRow, SensitivityRow, Tables, tabulate, write_csv

MAX_EVENT_ROWS = 200
FIGURES_DIR = "figures"


class ReportError(ValueError):
    """Input the report cannot be built from (no such path, no run directories)."""


@dataclass
class ReportResult:
    out_dir: Path
    html: Path
    markdown: Path
    csv: Path
    figures: dict[str, Path]
    runs: list[RunRow]
    sensitivity: list[SensitivityRow]
    shared_overrides: tuple[str, ...]
    spikes: SpikeOptions
    notes: list[str]
    headline: Optional[Headline] = None
    marks: Optional[SpikeMarks] = None
    tables: Optional[Tables] = None  # what write_report lays out
    paths: tuple[Path, ...] = ()
    lr_range: Optional[tuple[float, float]] = None
    title: str = "proxy instability report"

    def sensitivity_of(self, variant: str) -> SensitivityRow:
        """The row of a variant, by its label or by one of its overrides (``model.qk_norm=off``)."""
        for row in self.sensitivity:
            if variant == row.variant or variant in analysis.split_overrides(row.overrides):
                return row
        known = ", ".join(row.variant for row in self.sensitivity)
        raise KeyError(f"no variant {variant!r} in the report (variants: {known})")


# --------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------
# The runs table: named by what varies (RunRow.label), status and the key metrics first, so they
# stay in view on a laptop screen; the rest after (the table scrolls sideways in HTML).
RUN_COLUMNS = (
    ("run", "label"),
    ("status", "status"),
    ("final loss", "final_loss"),
    ("max attn logit peak", "max_attn_logit_peak"),
    ("spike % loss", "spike_score_loss"),
    ("spike % grad norm", "spike_score_grad_norm"),
    ("events", "events"),
    ("loss spikes", "loss_spikes"),
    ("collapses", "loss_collapses"),
    ("steps", None),
    ("final train (mean)", "final_train_loss"),
    ("final val", "final_val_loss"),
    ("loss@init", "loss_at_init"),
    ("max attn logit final", "max_attn_logit_final"),
    ("output logit mean", "output_logit_mean_final"),
)
EVENT_COLUMNS = ("run", STEP, EVENT, "trigger", "value", "threshold")


def _run_table(rows: list[RunRow]) -> Table:
    body = []
    for row in rows:
        cells = []
        for _, attr in RUN_COLUMNS:
            if attr is None:
                cells.append(f"{fmt(row.steps_completed)}/{fmt(row.steps_planned)}")
            else:
                cells.append(getattr(row, attr))
        body.append(cells)
    return Table([h for h, _ in RUN_COLUMNS], body)


def _sensitivity_blocks(sensitivity: list[SensitivityRow], lr_range: Optional[tuple[float, float]]) -> list[Block]:
    headers = [
        "variant",
        "LR sensitivity",
        "best LR",
        "best loss",
        "runs",
        "diverged",
        "failed",
        "params",
        "loss@init",
        "LR: loss",
        "note",
    ]
    rows = [
        [
            row.variant,
            row.sensitivity,
            row.best_lr,
            row.best_loss,
            row.n_runs,
            row.n_diverged,
            row.n_failed,
            row.n_params,
            row.loss_at_init,
            "; ".join(f"{lr:g}: {loss:.4g}" for lr, loss in zip(row.lrs, row.losses)),
            row.note,
        ]
        for row in sensitivity
    ]
    return [
        Heading("LR sensitivity"),
        Paragraph(
            "Wortsman et al. (2023): mean over the swept LRs of min(final loss, loss at init) minus the "
            "best loss over the range, per variant; diverged and failed runs count as the loss at init. "
            "Final loss = final val loss (train loss when no eval). "
            "Lower is better; read it beside the curves."
            + (f" Averaged over LRs in [{lr_range[0]:g}, {lr_range[1]:g}] only." if lr_range else "")
        ),
        Table(headers, rows, wrap=("LR: loss", "note")),
    ]


def _single_lr_blocks(sensitivity: list[SensitivityRow]) -> list[Block]:
    return [
        Heading("Variants"),
        Paragraph(
            "Each variant was trained at a single LR, so there is no LR sensitivity to compute "
            "(it needs an LR sweep). Final loss = final val loss (train loss when no eval), "
            "averaged over the variant's runs (seeds)."
        ),
        Table(
            ["variant", "LR", "final loss", "runs", "diverged", "failed", "params", "loss@init", "note"],
            [
                [
                    row.variant,
                    row.lrs[0] if row.lrs else None,
                    row.losses[0] if row.losses else None,
                    row.n_runs,
                    row.n_diverged,
                    row.n_failed,
                    row.n_params,
                    row.loss_at_init,
                    "; ".join(n for n in row.note.split("; ") if n != SINGLE_LR_NOTE),
                ]
                for row in sensitivity
            ],
            wrap=("note",),
        ),
    ]


def _event_details(event: dict) -> str:
    """The fields of an event beyond the common ones (a divergence's reason, a rollback's target)."""
    return ", ".join(f"{k}={fmt(v)}" for k, v in event.items() if k not in EVENT_COLUMNS)


def _incomplete_blocks(rows: list[RunRow]) -> list[Block]:
    """The runs that did not complete, each with why and where."""
    items = []
    for row in rows:
        if row.status == COMPLETED:
            continue
        detail = {
            STATUS_DIVERGED: f"diverged at step {fmt(row.diverged_at_step)}",
            FAILED: f"failed: {row.error or 'no error recorded'}",
            RUNNING: "still running, or its process died (status never finalised)",
            INTERRUPTED: f"interrupted at step {fmt(row.steps_completed)} (train.resume=true goes on)",
            UNKNOWN: "no summary.json: listed from its metrics and config",
            UNREADABLE: f"unreadable, left out of every table and figure: {row.error}",
        }.get(row.status, f"status {row.status}")
        items.append(f"{row.label}: {detail} — {row.path}")
    return [Heading("Runs that did not complete"), Items(items)] if items else []


def _runs_blocks(tables: Tables, spikes: SpikeOptions) -> list[Block]:
    source = {analysis.OLMO2_SPIKES: " (OLMo 2)", analysis.OLMO_CORE_SPIKES: " (OLMo-core's detector)"}
    blocks: list[Block] = [Heading("Runs")]
    if tables.constant:
        blocks.append(Paragraph("Every run: " + ", ".join(tables.constant) + ". Runs are named by what varies."))
    return blocks + [
        Paragraph(
            f"Final loss = final val loss (train loss when no eval). Final train (mean) = the mean train "
            f"loss of the run's last train.log_every steps (summary.json final_train_loss), not the last "
            f"step's, which the log's lines show. Loss spikes and collapses are counted on probe/loss "
            f"(train.probe_every; proxy/spikes.py). "
            f"Spike score{source.get(spikes, '')}: % of logged points {spikes.describe()}."
        ),
        _run_table(tables.runs),
    ]


def _events_blocks(events: list[tuple[str, dict]]) -> list[Block]:
    if not events:
        return []
    blocks: list[Block] = [Heading("Events")]
    shown = events[:MAX_EVENT_ROWS]
    if len(events) > len(shown):
        blocks.append(Paragraph(f"First {len(shown)} of {len(events)} events (all are in each run's metrics.jsonl)."))
    blocks.append(
        Table(
            [*EVENT_COLUMNS, "details"],
            [[name, *(e.get(k) for k in EVENT_COLUMNS[1:]), _event_details(e)] for name, e in shown],
            wrap=("details",),
        )
    )
    return blocks


def _blocks(result: ReportResult) -> list[Block]:
    """The document: the headline, then what it was computed from."""
    tables = result.tables
    assert tables is not None and result.headline is not None and result.marks is not None
    counts = Counter(row.status for row in tables.runs)
    blocks: list[Block] = [
        *result.headline.blocks(),
        Paragraph(
            f"{len(tables.runs)} runs from {', '.join(str(p) for p in result.paths)}; "
            f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}."
        ),
        Paragraph("Status: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + "."),
        *_incomplete_blocks(tables.runs),
    ]
    if all(len(row.lrs) <= 1 for row in tables.sensitivity):
        blocks += _single_lr_blocks(tables.sensitivity)  # no LR sweep: no LR sensitivity to show
    else:
        blocks += _sensitivity_blocks(tables.sensitivity, result.lr_range)
    figure = lambda name: Figure(f"{FIGURES_DIR}/{result.figures[name].name}", CAPTIONS[name])  # noqa: E731
    if "lr_vs_loss" in result.figures:
        blocks.append(figure("lr_vs_loss"))
    blocks += _runs_blocks(tables, result.spikes)
    curves = [name for name in result.figures if name != "lr_vs_loss"]
    if curves:
        blocks += [Heading("Curves over steps"), Paragraph(f"Red circles: {result.marks.describe()}.")]
        blocks += [figure(name) for name in curves]
    blocks += _events_blocks(
        [(row.label, e) for _, members in tables.groups for row, run in members for e in run.events]
    )
    if result.notes:
        blocks += [Heading("Notes"), Items(result.notes)]
    return blocks


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def default_out_dir(first_path: str | Path) -> Path:
    first = Path(first_path)
    return (first if first.is_dir() else first.parent) / "report"


def collect_report(
    paths: Sequence[str | Path] | str | Path,
    out_dir: Optional[str | Path] = None,
    *,
    spikes: Optional[SpikeOptions] = None,
    marks: Optional[SpikeMarks] = None,
    lr_range: Optional[tuple[float, float]] = None,
    title: str = "proxy instability report",
    figures: bool = True,
) -> ReportResult:
    """Read every run directory at or below ``paths``, tabulate, and draw the figures into
    ``out_dir``/figures (``figures=False``: tables only, the figures' seconds saved where they are
    drawn again later, e.g. a GPU lease's verdicts); the documents are written by :func:`write_report`."""
    if lr_range is not None and not 0 < lr_range[0] <= lr_range[1]:
        raise ReportError(f"lr_range={lr_range} must be two LRs with 0 < low <= high")
    roots = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not roots:
        raise ReportError("no path given")
    for path in roots:
        if not path.exists():
            raise ReportError(f"no such path: {path}")
    spikes = spikes or analysis.OLMO2_SPIKES
    marks = marks or SpikeMarks(spikes)
    run_dirs = find_runs(roots)
    if not run_dirs:
        raise ReportError(f"no run directories (with summary.json) under {', '.join(map(str, roots))}")
    out = output_dir(out_dir if out_dir is not None else default_out_dir(roots[0]), what="the report")

    tables = tabulate([load_run(d) for d in run_dirs], spikes, lr_range)
    drawn, notes = (
        draw_figures(tables, marks, output_dir(out, FIGURES_DIR, what="the report's figures"))
        if figures
        else ({}, ["figures left out (figures=False); proxy-report or proxy-verdict on these runs draws them"])
    )
    for row in tables.runs:
        if row.final_loss is None and row.status == COMPLETED:
            notes.append(f"{row.label}: completed but no final loss recorded")
    return ReportResult(
        out_dir=out,
        html=out / "report.html",
        markdown=out / "report.md",
        csv=out / "runs.csv",
        figures=drawn,
        runs=tables.runs,
        sensitivity=tables.sensitivity,
        shared_overrides=tables.shared_overrides,
        spikes=spikes,
        notes=notes,
        headline=headline_of(tables),
        marks=marks,
        tables=tables,
        paths=tuple(roots),
        lr_range=lr_range,
        title=title,
    )


def write_report(result: ReportResult, verdict: Optional[VerdictSummary] = None) -> ReportResult:
    """Write runs.csv, report.html and report.md of a collected report; a finding's ``verdict``
    joins the headline at the top. Each file is written whole or not at all (the figures were,
    by :func:`collect_report`), report.md last: an interrupted report leaves the previous one."""
    if result.tables is None or result.headline is None:
        raise ReportError("write_report needs a report from collect_report")
    if verdict is not None:
        result.headline.verdict = verdict
    blocks = _blocks(result)
    write_csv(result.csv, result.tables.runs)
    atomic_write_text(result.html, to_html(result.title, blocks, result.out_dir) + "\n")
    atomic_write_text(result.markdown, to_markdown(result.title, blocks) + "\n")
    return result


def build_report(
    paths: Sequence[str | Path] | str | Path, out_dir: Optional[str | Path] = None, **options: Any
) -> ReportResult:
    """Read every run directory at or below ``paths`` and write the report into ``out_dir``:
    :func:`collect_report` with the same keyword options, then :func:`write_report`.

    ``spikes`` sets the spike score of the runs table (default: OLMo 2's, as published);
    ``marks`` the spikes circled in the figures (default: the same detector, warm-up left out);
    ``lr_range`` (inclusive) restricts the LRs that LR sensitivity averages over, for when the
    optimum sits near one end of the sweep (Wortsman et al. shift the range too). The curves
    always show every LR.
    """
    return write_report(collect_report(paths, out_dir, **options))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="proxy-report",
        description="Build an instability report (report.html, report.md, figures/, runs.csv) from run directories.",
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="run directories, multirun directories, or folders holding them"
    )
    p.add_argument("--out", metavar="DIR", help="output folder (default: <first PATH>/report)")
    p.add_argument("--title", default="proxy instability report")
    p.add_argument(
        "--lr-range",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="LR sensitivity over these LRs only (inclusive)",
    )
    d = analysis.OLMO2_SPIKES
    p.add_argument(
        "--spike-sigma",
        type=float,
        default=d.sigma,
        help=f"spike threshold in std (default {d.sigma:g}, OLMo 2; OLMo-core: 6)",
    )
    p.add_argument(
        "--spike-window",
        type=int,
        default=d.window,
        help=f"rolling window in logged points (default {d.window}; OLMo-core: 128)",
    )
    p.add_argument("--one-sided", action="store_true", help="count only upward excursions (OLMo-core)")
    p.add_argument(
        "--spike-min-history",
        type=int,
        default=d.min_history,
        help=f"points with fewer predecessors are not scored (default {d.min_history})",
    )
    p.add_argument(
        "--mark-warmup",
        action="store_true",
        help="circle spikes during warm-up too (default: not before schedule.warmup_steps)",
    )
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spikes = SpikeOptions(args.spike_sigma, args.spike_window, args.one_sided, args.spike_min_history)
    except ValueError as exc:
        print(f"proxy-report: error: {exc}", file=sys.stderr)
        return 2
    try:
        lr_range = tuple(args.lr_range) if args.lr_range else None
        marks = SpikeMarks(spikes, skip_warmup=not args.mark_warmup)
        result = build_report(args.paths, args.out, spikes=spikes, marks=marks, lr_range=lr_range, title=args.title)
    except (ReportError, OSError, ValueError) as exc:  # ValueError: UnsafePathError (an output folder that is a link)
        print(f"proxy-report: error: {terminal_text(exc)}", file=sys.stderr)
        return 2
    unreadable = [row for row in result.runs if row.status == UNREADABLE]
    for row in unreadable:
        print(f"proxy-report: unreadable: {terminal_text(row.error)}", file=sys.stderr)
    print(f"{len(result.runs)} runs -> {terminal_text(result.html.resolve())}")
    return 0


__all__ = ["ReportError", "ReportResult", "build_report", "collect_report", "default_out_dir", "main", "write_report"]
