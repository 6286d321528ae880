"""``proxy-report``: run directories in, an instability report out.

    proxy-report runs/multirun/2026-01-01/12-00-00 [more paths...] [--out DIR]

writes ``report.html`` (self-contained: figures embedded as base64 PNG), ``report.md`` (linking
``figures/*.png``) and ``runs.csv`` into DIR (default: ``<first path>/report``). What goes in it:
the tables (proxy/report/tables.py), the figures (proxy/report/figures.py), laid out here as one
document (proxy/report/document.py).
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
from proxy.records import (COMPLETED, EVENT, FAILED, INTERRUPTED, RUNNING, STATUS_DIVERGED, STEP, UNKNOWN, find_runs,
                           load_run)
from proxy.report.document import Block, Figure, Heading, Items, Paragraph, Table, fmt, to_html, to_markdown
from proxy.report.figures import CAPTIONS, draw_figures
from proxy.report.tables import SINGLE_LR_NOTE, RunRow, SensitivityRow, tabulate, write_csv

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

    def sensitivity_of(self, variant: str) -> SensitivityRow:
        """The row of a variant, by its label or by one of its overrides (``model.qk_norm=off``)."""
        for row in self.sensitivity:
            if variant == row.variant or variant in row.overrides.split(", "):
                return row
        known = ", ".join(row.variant for row in self.sensitivity)
        raise KeyError(f"no variant {variant!r} in the report (variants: {known})")


# --------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------
RUN_COLUMNS = (
    ("run", "name"),
    ("variant", "variant"),
    ("lr", "lr"),
    ("seed", "seed"),
    ("status", "status"),
    ("steps", None),
    ("loss@init", "loss_at_init"),
    ("final train", "final_train_loss"),
    ("final val", "final_val_loss"),
    ("max attn logit peak", "max_attn_logit_peak"),
    ("max attn logit final", "max_attn_logit_final"),
    ("output logit mean", "output_logit_mean_final"),
    ("spike % loss", "spike_score_loss"),
    ("spike % grad norm", "spike_score_grad_norm"),
    ("events", "events"),
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
    headers = ["variant", "params", "LR sensitivity", "best LR", "best loss", "loss@init", "runs",
               "diverged", "failed", "LR: loss", "note"]
    rows = [[row.variant, row.n_params, row.sensitivity, row.best_lr, row.best_loss, row.loss_at_init,
             row.n_runs, row.n_diverged, row.n_failed,
             "; ".join(f"{lr:g}: {loss:.4g}" for lr, loss in zip(row.lrs, row.losses)), row.note]
            for row in sensitivity]
    return [
        Heading("LR sensitivity"),
        Paragraph(
            "Wortsman et al. (2023): mean over the swept LRs of min(final loss, loss at init) minus the "
            "best loss over the range, per variant; diverged and failed runs count as the loss at init. "
            "Final loss = final val loss (train loss when no eval). "
            "Lower is better; read it beside the curves."
            + (f" Averaged over LRs in [{lr_range[0]:g}, {lr_range[1]:g}] only." if lr_range else "")
        ),
        Table(headers, rows),
    ]


def _single_lr_blocks(sensitivity: list[SensitivityRow]) -> list[Block]:
    return [
        Heading("Variants"),
        Paragraph("Each variant was trained at a single LR, so there is no LR sensitivity to compute "
                  "(it needs an LR sweep). Final loss = final val loss (train loss when no eval), "
                  "averaged over the variant's runs (seeds)."),
        Table(["variant", "params", "LR", "final loss", "loss@init", "runs", "diverged", "failed", "note"],
              [[row.variant, row.n_params, row.lrs[0] if row.lrs else None,
                row.losses[0] if row.losses else None, row.loss_at_init, row.n_runs, row.n_diverged,
                row.n_failed, "; ".join(n for n in row.note.split("; ") if n != SINGLE_LR_NOTE)]
               for row in sensitivity]),
    ]


def _event_details(event: dict) -> str:
    """The fields of an event beyond the common ones (a divergence's reason, a rollback's target)."""
    return ", ".join(f"{k}={fmt(v)}" for k, v in event.items() if k not in EVENT_COLUMNS)


def _blocks(
    result_runs: list[RunRow],
    sensitivity: list[SensitivityRow],
    shared: tuple[str, ...],
    spikes: SpikeOptions,
    paths: Sequence[Path],
    figures: dict[str, Path],
    events: list[tuple[str, dict]],
    notes: list[str],
    lr_range: Optional[tuple[float, float]] = None,
) -> list[Block]:
    counts = Counter(row.status for row in result_runs)
    blocks: list[Block] = [
        Paragraph(f"{len(result_runs)} runs from {', '.join(str(p) for p in paths)}; "
                  f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}."),
        Paragraph("Status: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + "."),
    ]
    if shared:
        blocks.append(Paragraph("Overrides shared by every run: " + ", ".join(shared) + "."))
    attention = [row for row in result_runs if row.status != COMPLETED]
    if attention:
        items = []
        for row in attention:
            detail = {
                STATUS_DIVERGED: f"diverged at step {fmt(row.diverged_at_step)}",
                FAILED: f"failed: {row.error or 'no error recorded'}",
                RUNNING: "still running, or its process died (status never finalised)",
                INTERRUPTED: f"interrupted at step {fmt(row.steps_completed)} (train.resume=true goes on)",
                UNKNOWN: "no summary.json: listed from its metrics and config",
            }.get(row.status, f"status {row.status}")
            items.append(f"{row.name} [{row.variant}, lr {fmt(row.lr)}]: {detail} — {row.path}")
        blocks += [Heading("Runs that did not complete"), Items(items)]
    if all(len(row.lrs) <= 1 for row in sensitivity):
        blocks += _single_lr_blocks(sensitivity)  # no LR sweep: no LR sensitivity to show
    else:
        blocks += _sensitivity_blocks(sensitivity, lr_range)
    figure = lambda name: Figure(f"{FIGURES_DIR}/{figures[name].name}", CAPTIONS[name])  # noqa: E731
    if "lr_vs_loss" in figures:
        blocks.append(figure("lr_vs_loss"))
    source = {analysis.OLMO2_SPIKES: " (OLMo 2)", analysis.OLMO_CORE_SPIKES: " (OLMo-core's detector)"}
    blocks += [
        Heading("Runs"),
        Paragraph(f"Spike score{source.get(spikes, '')}: % of logged points {spikes.describe()}."),
        _run_table(result_runs),
    ]
    curves = [name for name in figures if name != "lr_vs_loss"]
    if curves:
        blocks.append(Heading("Curves over steps"))
        blocks += [figure(name) for name in curves]
    if events:
        blocks.append(Heading("Events"))
        shown = events[:MAX_EVENT_ROWS]
        if len(events) > len(shown):
            blocks.append(Paragraph(f"First {len(shown)} of {len(events)} events (all are in each run's "
                                    "metrics.jsonl)."))
        blocks.append(Table([*EVENT_COLUMNS, "details"],
                            [[name, *(e.get(k) for k in EVENT_COLUMNS[1:]), _event_details(e)]
                             for name, e in shown]))
    if notes:
        blocks += [Heading("Notes"), Items(notes)]
    return blocks


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def default_out_dir(first_path: str | Path) -> Path:
    first = Path(first_path)
    return (first if first.is_dir() else first.parent) / "report"


def build_report(
    paths: Sequence[str | Path] | str | Path,
    out_dir: Optional[str | Path] = None,
    *,
    spikes: Optional[SpikeOptions] = None,
    lr_range: Optional[tuple[float, float]] = None,
    title: str = "proxy instability report",
) -> ReportResult:
    """Read every run directory at or below ``paths`` and write the report into ``out_dir``.

    ``spikes`` sets the spike detector (default: OLMo 2's); ``lr_range`` (inclusive) restricts
    the LRs that LR sensitivity averages over, for when the optimum sits near one end of the
    sweep (Wortsman et al. shift the range too). The curves always show every LR.
    """
    if lr_range is not None and not 0 < lr_range[0] <= lr_range[1]:
        raise ReportError(f"lr_range={lr_range} must be two LRs with 0 < low <= high")
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise ReportError("no path given")
    for path in paths:
        if not path.exists():
            raise ReportError(f"no such path: {path}")
    spikes = spikes or analysis.OLMO2_SPIKES
    run_dirs = find_runs(paths)
    if not run_dirs:
        raise ReportError(f"no run directories (with summary.json) under {', '.join(map(str, paths))}")
    out = Path(out_dir) if out_dir is not None else default_out_dir(paths[0])

    tables = tabulate([load_run(d) for d in run_dirs], spikes, lr_range)
    figures, notes = draw_figures(tables, spikes, out / FIGURES_DIR)
    for row in tables.runs:
        if row.final_loss is None and row.status == COMPLETED:
            notes.append(f"{row.name}: completed but no final loss recorded")
    events = [(run.name, e) for _, members in tables.groups for _, run in members for e in run.events]
    blocks = _blocks(tables.runs, tables.sensitivity, tables.shared_overrides, spikes, paths, figures, events,
                     notes, lr_range)
    result = ReportResult(
        out_dir=out,
        html=out / "report.html",
        markdown=out / "report.md",
        csv=out / "runs.csv",
        figures=figures,
        runs=tables.runs,
        sensitivity=tables.sensitivity,
        shared_overrides=tables.shared_overrides,
        spikes=spikes,
        notes=notes,
    )
    result.markdown.write_text(to_markdown(title, blocks) + "\n")
    result.html.write_text(to_html(title, blocks, out) + "\n")
    write_csv(result.csv, tables.runs)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="proxy-report",
        description="Build an instability report (report.html, report.md, figures/, runs.csv) "
        "from run directories.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="run directories, multirun directories, or folders holding them")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <first PATH>/report)")
    p.add_argument("--title", default="proxy instability report")
    p.add_argument("--lr-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   help="LR sensitivity over these LRs only (inclusive)")
    d = analysis.OLMO2_SPIKES
    p.add_argument("--spike-sigma", type=float, default=d.sigma,
                   help=f"spike threshold in std (default {d.sigma:g}, OLMo 2; OLMo-core: 6)")
    p.add_argument("--spike-window", type=int, default=d.window,
                   help=f"rolling window in logged points (default {d.window}; OLMo-core: 128)")
    p.add_argument("--one-sided", action="store_true", help="count only upward excursions (OLMo-core)")
    p.add_argument("--spike-min-history", type=int, default=d.min_history,
                   help=f"points with fewer predecessors are not scored (default {d.min_history})")
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
        result = build_report(args.paths, args.out, spikes=spikes, lr_range=lr_range, title=args.title)
    except ReportError as exc:
        print(f"proxy-report: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(result.runs)} runs -> {result.html.resolve()}")
    return 0


__all__ = ["ReportError", "ReportResult", "build_report", "default_out_dir", "main"]
