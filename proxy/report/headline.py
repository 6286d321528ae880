"""The headline a report opens with, and proxy-demo prints: the variants compared, their key
numbers, and the verdict when a finding is judged.

Read off the report's own tables (proxy/report/tables.py: the SensitivityRow of each variant, the
RunRow of each run), never computed a second way, so the headline quotes the numbers the body
prints. For 2 to :data:`MAX_COMPACT` variants the lead compares them in one line::

    model.qk_norm: off vs layernorm (8 runs: 8 completed): LR sensitivity 0.504 vs 0.132;
    at LR 0.3: peak attention logit 8.68e5 vs 44.1, final loss 5.12 vs 3.71.

then one line per variant gives its own numbers (best LR, what happened at the top LR).
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

from proxy.analysis import parse_override, split_overrides
from proxy.records import COMPLETED
from proxy.report.document import Block, Callout
from proxy.report.tables import BLOWN_UP, RunRow, SensitivityRow, Tables, finite

MAX_COMPACT = 4  # more variants than this: no one-line comparison, one line per variant only


def num(value: Optional[float]) -> str:
    """A headline number: 3 significant digits, exponents short (8.68e5), 'n/a' for nothing."""
    if value is None:
        return "n/a"
    if not finite(value):
        return str(value)
    text = f"{value:.3g}"
    mantissa, sep, exponent = text.partition("e")
    return f"{mantissa}e{int(exponent)}" if sep else text


# --------------------------------------------------------------------------------------------
# A finding's verdict, as the report shows it
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    text: str
    measured: str
    holds: bool


@dataclass(frozen=True)
class VerdictSummary:
    """What the report shows of a verdict (proxy.verdict.Verdict.summary()): its label and claims."""

    finding: str
    label: str
    claims: tuple[Claim, ...]

    @property
    def reproduced(self) -> bool:
        return bool(self.claims) and all(c.holds for c in self.claims)

    def lead(self) -> str:
        held = sum(c.holds for c in self.claims)
        return f"{held} of {len(self.claims)} claims hold."

    def items(self) -> list[str]:
        """Failed claims first, each with what was measured; then those that hold."""
        ordered = [c for c in self.claims if not c.holds] + [c for c in self.claims if c.holds]
        return [f"{'holds' if c.holds else 'FAILS'}: {c.text} (measured: {c.measured})" for c in ordered]

    def title(self) -> str:
        return f"Verdict: {self.label} ({self.finding})"

    def callout(self) -> Callout:
        return Callout(self.title(), self.items(), self.lead(), "pass" if self.reproduced else "fail")


# --------------------------------------------------------------------------------------------
# The numbers of one variant
# --------------------------------------------------------------------------------------------
@dataclass
class VariantNumbers:
    """One variant's key numbers, read off its SensitivityRow and the RunRows at one LR."""

    label: str
    swept: bool  # more than one LR: LR sensitivity and best LR mean something
    sensitivity: Optional[float]
    best_lr: Optional[float]
    best_loss: Optional[float]
    at_lr: Optional[float]  # the LR the runs below were trained at
    statuses: Counter = field(default_factory=Counter)  # of the runs at that LR
    final_loss: Optional[float] = None  # median over the runs at that LR (seeds) that did not blow up
    attn_logit_peak: Optional[float] = None  # median over the runs at that LR
    n_runs: int = 0
    n_blown_up: int = 0  # diverged or failed, at any LR

    def status_text(self) -> str:
        return ", ".join(
            f"{n} {status}" if sum(self.statuses.values()) > 1 else status for status, n in self.statuses.most_common()
        )

    def at_lr_text(self) -> str:
        parts = [self.status_text()] if self.statuses else []
        parts += [f"final loss {num(self.final_loss)}"] if self.final_loss is not None else []
        parts += [f"peak attention logit {num(self.attn_logit_peak)}"] if self.attn_logit_peak is not None else []
        return f"at LR {self.at_lr:g}: " + ", ".join(parts) if self.at_lr is not None and parts else ""

    def line(self) -> str:
        parts = []
        if self.swept:
            parts.append(f"LR sensitivity {num(self.sensitivity)}")
            if self.best_lr is not None:
                parts.append(f"best LR {self.best_lr:g} (loss {num(self.best_loss)})")
        text = f"{self.label}: " + ", ".join(parts)
        at_lr = self.at_lr_text()
        if at_lr:
            text += ("; " if parts else "") + at_lr
        if self.n_blown_up:
            text += f"; {self.n_blown_up} of {self.n_runs} runs diverged or failed"
        return text


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if finite(v)]
    return statistics.median(kept) if kept else None


def variant_numbers(row: SensitivityRow, members: Sequence[RunRow], at_lr: Optional[float]) -> VariantNumbers:
    at = [r for r in members if r.lr is not None and r.lr == at_lr]
    return VariantNumbers(
        label=row.variant,
        swept=len(row.lrs) > 1,
        sensitivity=row.sensitivity,
        best_lr=row.best_lr,
        best_loss=row.best_loss,
        at_lr=at_lr if at else None,
        statuses=Counter(r.status for r in at),
        final_loss=_median([r.final_loss for r in at if r.status not in BLOWN_UP]),
        attn_logit_peak=_median([r.max_attn_logit_peak for r in at]),
        n_runs=len(members),
        n_blown_up=sum(r.status in BLOWN_UP for r in members),
    )


def top_lr(groups: Sequence[Sequence[RunRow]]) -> list[Optional[float]]:
    """Per variant, the LR its numbers are quoted at: the highest LR every variant ran (where
    instabilities show), else each variant's own highest."""
    lr_sets = [{r.lr for r in rows if r.lr is not None} for rows in groups]
    common = set.intersection(*lr_sets) if lr_sets else set()
    if common:
        return [max(common)] * len(groups)
    return [max(lrs) if lrs else None for lrs in lr_sets]


# --------------------------------------------------------------------------------------------
# The headline
# --------------------------------------------------------------------------------------------
def compared_names(labels: Sequence[str]) -> str:
    """'model.qk_norm: off vs layernorm' when the variants differ in one key only, else the
    labels joined by 'vs'."""
    parsed = [dict(parse_override(item) for item in split_overrides(label)) for label in labels]
    keys = set(parsed[0]) if parsed else set()
    if len(parsed) > 1 and all(set(p) == keys for p in parsed):
        differing = [k for k in sorted(keys) if len({p[k] for p in parsed}) > 1]
        if len(differing) == 1:
            key = differing[0]
            return f"{key}: " + " vs ".join(p[key] for p in parsed)
    return " vs ".join(labels)


def _versus(values: Sequence[Optional[float]]) -> str:
    return " vs ".join(num(v) for v in values)


def compact_comparison(numbers: Sequence[VariantNumbers]) -> str:
    """The key numbers of every variant side by side, metric by metric."""
    parts = []
    if all(n.swept for n in numbers):
        parts.append(f"LR sensitivity {_versus([n.sensitivity for n in numbers])}")
    at_lrs = {n.at_lr for n in numbers}
    if len(at_lrs) == 1 and None not in at_lrs:
        at = []
        if any(n.attn_logit_peak is not None for n in numbers):
            at.append(f"peak attention logit {_versus([n.attn_logit_peak for n in numbers])}")
        if any(n.final_loss is not None for n in numbers):
            at.append(f"final loss {_versus([n.final_loss for n in numbers])}")
        if at:
            parts.append(f"at LR {next(iter(at_lrs)):g}: " + ", ".join(at))
    if any(n.n_blown_up for n in numbers):
        parts.append("diverged or failed " + " vs ".join(f"{n.n_blown_up}/{n.n_runs}" for n in numbers) + " runs")
    return "; ".join(parts)


@dataclass
class Headline:
    lead: str  # what was compared, on how many runs, and (2-4 variants) the numbers side by side
    variants: list[str]  # one line per variant
    verdict: Optional[VerdictSummary] = None

    def blocks(self) -> list[Block]:
        blocks: list[Block] = [Callout("Result", self.variants, self.lead)]
        if self.verdict is not None:
            blocks.append(self.verdict.callout())
        return blocks

    def text(self) -> list[str]:
        """The headline as console lines (proxy-demo)."""
        lines = [self.lead, *(f"  {line}" for line in self.variants)]
        if self.verdict is not None:
            lines += [f"{self.verdict.title()}: {self.verdict.lead()}", *(f"  {item}" for item in self.verdict.items())]
        return lines


def _runs_text(rows: Sequence[RunRow]) -> str:
    counts = Counter(row.status for row in rows)
    order = sorted(counts, key=lambda s: (s != COMPLETED, s))
    return f"{len(rows)} run{'s' if len(rows) != 1 else ''}: " + ", ".join(f"{counts[s]} {s}" for s in order)


def headline_of(tables: Tables, verdict: Optional[VerdictSummary] = None) -> Headline:
    """The headline of a report's tables."""
    members = [[row for row, _ in rows] for _, rows in tables.groups]
    at_lrs = top_lr(members)
    numbers = [variant_numbers(row, rows, lr) for row, rows, lr in zip(tables.sensitivity, members, at_lrs)]
    runs = _runs_text(tables.runs)
    if len(numbers) == 1:
        lead = f"One variant ({numbers[0].label}; {runs})."
    elif len(numbers) <= MAX_COMPACT:
        comparison = compact_comparison(numbers)
        lead = f"{compared_names([n.label for n in numbers])} ({runs})" + (f": {comparison}." if comparison else ".")
    else:
        lead = f"{len(numbers)} variants ({runs}), one line each:"
    return Headline(lead, [n.line() for n in numbers], verdict)


__all__ = [
    "Claim",
    "Headline",
    "MAX_COMPACT",
    "VariantNumbers",
    "VerdictSummary",
    "compact_comparison",
    "compared_names",
    "headline_of",
    "num",
    "top_lr",
    "variant_numbers",
]
