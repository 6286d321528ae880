"""The report's tables as data: one :class:`RunRow` per run directory, one :class:`SensitivityRow`
per variant (a run's command-line overrides minus the LR and the seed: the runs of one
LR-sensitivity curve). The verdicts of experiments/ read these, so every number a verdict
quotes is the number the report prints.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence, TypeGuard

from proxy import analysis
from proxy.analysis import SpikeOptions
from proxy.config import type_errors
from proxy.records import (
    ATTN_MAX_LOGIT,
    ATTN_MAX_LOGIT_LAYER,
    COMPLETED,
    EVENT,
    FAILED,
    GRAD_NORM,
    OUTPUT_LOGIT_MEAN,
    PROBE_LOSS,
    STATUS_DIVERGED,
    STEP,
    TRAIN_LOSS,
    VAL_LOSS,
    Run,
    Summary,
    atomic_write_text,
)
from proxy.report.document import csv_cell
from proxy.spikes import loss_spikes

LR_KEY, SEED_KEY = analysis.SWEEP_AXES  # a run label spells them as its name does
FINISHED = (COMPLETED, STATUS_DIVERGED, FAILED)  # runs that are points of an LR curve
BLOWN_UP = (STATUS_DIVERGED, FAILED)  # count as the loss at init (Wortsman et al.)
SINGLE_LR_NOTE = "a single LR: sensitivity is 0 by construction"  # left out when no variant has more


# --------------------------------------------------------------------------------------------
# Tables as data
# --------------------------------------------------------------------------------------------
@dataclass
class RunRow:
    """One run directory, reduced to the numbers the report tabulates."""

    name: str
    path: str
    variant: str  # short label (what tells this variant apart from the others)
    overrides: str  # the variant's full overrides, ","-joined (the run name's spelling)
    lr: Optional[float]
    seed: Optional[int]
    status: str
    steps_completed: Optional[int]
    steps_planned: Optional[int]
    loss_at_init: Optional[float]
    final_train_loss: Optional[float]
    final_val_loss: Optional[float]
    best_val_loss: Optional[float]
    max_attn_logit_peak: Optional[float]
    max_attn_logit_final: Optional[float]
    output_logit_mean_final: Optional[float]
    spike_score_loss: Optional[float]
    spike_score_grad_norm: Optional[float]
    diverged_at_step: Optional[int]
    events: dict[str, int] = field(default_factory=dict)
    loss_spikes: Optional[int] = None  # on probe/loss (proxy/spikes.py): rise and recovery
    loss_collapses: Optional[int] = None  # ... a rise that did not come back
    n_params: Optional[int] = None
    n_params_non_embedding: Optional[int] = None
    tokens: Optional[int] = None
    wall_time_s: Optional[float] = None
    sweep_id: Optional[str] = None
    experiment: Optional[str] = None
    code_commit: Optional[str] = None  # the commit it trained with, 12 digits, "+dirty" with local changes
    error: Optional[str] = None
    label: str = ""  # the run's name in the report: what varies across the runs (run_labels)

    @property
    def final_loss(self) -> Optional[float]:
        """The loss an LR curve uses: final val loss, else final train loss."""
        for value in (self.final_val_loss, self.final_train_loss):
            if finite(value):
                return value
        return None


@dataclass
class SensitivityRow:
    """One variant's LR curve and its LR sensitivity."""

    variant: str
    overrides: str
    n_params: Optional[int]
    lrs: list[float]
    losses: list[float]  # per LR: min(final loss, loss at init), repeats averaged
    blown_up_lrs: list[float]  # LRs where at least one run diverged or failed
    loss_at_init: Optional[float]
    best_lr: Optional[float]
    best_loss: Optional[float]
    sensitivity: Optional[float]  # None: not computable (see note)
    n_runs: int
    n_diverged: int
    n_failed: int
    n_excluded: int  # running / unknown: listed in the runs table, not on the curve
    note: str = ""


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------
def finite(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> Optional[float]:
    """A summary/config value as a float; strings like '1e-3' too, interpolations not."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _integer(value: Any) -> Optional[int]:
    number = _number(value)
    return int(number) if number is not None and math.isfinite(number) else None


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def layer_index(key: str) -> int:
    suffix = key[len(ATTN_MAX_LOGIT_LAYER) :]
    return int(suffix) if suffix.isdigit() else -1


def layer_keys(run: Run) -> list[str]:
    return sorted((k for k in run.keys() if k.startswith(ATTN_MAX_LOGIT_LAYER)), key=layer_index)


def _loss_at_init(run: Run) -> Optional[float]:
    """Summary value, else the val (or train) loss logged at step 0."""
    value = run.summary.loss_at_init
    if value is not None:
        return value
    for key in (VAL_LOSS, TRAIN_LOSS):
        steps, values = run.series(key)
        if steps and steps[0] == 0 and finite(values[0]):
            return values[0]
    return None


def usable(run: Run) -> Run:
    """The run as the tables and the verdicts use it: one whose config holds a value of the
    wrong type for its key, or whose LR (in its summary or its config) is not a positive finite
    number, is listed unreadable (its path and why, nothing else); proxy writes neither."""
    if run.error is not None:
        return run
    reason = type_errors(run.config)
    for where, value in (("its summary's lr", run.summary.lr), ("optim.lr", run.config_value("optim.lr"))):
        number = _number(value)
        if reason is None and value is not None and (number is None or not (math.isfinite(number) and number > 0)):
            reason = f"{where} ({str(value)[:40]}) is not a positive finite number"
    if reason is None:
        return run
    return Run(path=run.path, summary=Summary(), config={}, error=f"{run.path}: {reason}")


def run_row(run: Run, spikes: SpikeOptions) -> tuple[RunRow, tuple[str, ...]]:
    """The run's row and its variant (the run as :func:`usable` gives it)."""
    s = run.summary
    overrides = run.overrides
    variant = analysis.variant_of(overrides)
    lr = _first(
        s.lr,
        _number(run.config_value("optim.lr")),
        _number(analysis.override_value(overrides, "optim.lr")),
    )
    _, attn = run.series(ATTN_MAX_LOGIT)
    if not attn:  # older runs: only per-layer keys
        per_layer = [run.series(k)[1] for k in layer_keys(run)]
        attn = [max(vals) for vals in zip(*per_layer)] if per_layer else []
    _, train = run.series(TRAIN_LOSS)
    _, val = run.series(VAL_LOSS)
    _, grad_norm = run.series(GRAD_NORM)
    _, out_mean = run.series(OUTPUT_LOGIT_MEAN)
    last_step = max((row[STEP] for row in run.metrics), default=None)
    spike_counts = _loss_spike_counts(run)
    row = RunRow(
        name=run.name,
        path=str(run.path),
        variant="",  # labelled once every variant is known
        overrides=",".join(variant),
        lr=lr,
        seed=_integer(run.config_value("train.seed")),
        status=str(run.status),
        steps_completed=_first(s.steps_completed, last_step),
        steps_planned=_first(s.steps_planned, _integer(run.config_value("train.steps"))),
        loss_at_init=_loss_at_init(run),
        final_train_loss=_first(s.final_train_loss, train[-1] if train else None),
        final_val_loss=_first(s.final_val_loss, val[-1] if val else None),
        best_val_loss=_first(s.best_val_loss, min((v for v in val if finite(v)), default=None)),
        max_attn_logit_peak=_first(s.max_attn_logit_peak, analysis.peak(attn)),
        max_attn_logit_final=_first(s.max_attn_logit_final, analysis.last_finite(attn)),
        output_logit_mean_final=_first(s.output_logit_mean_final, analysis.last_finite(out_mean)),
        spike_score_loss=analysis.spike_score(train, spikes) if train else None,
        spike_score_grad_norm=analysis.spike_score(grad_norm, spikes) if grad_norm else None,
        diverged_at_step=s.diverged_at_step,
        loss_spikes=spike_counts[0],
        loss_collapses=spike_counts[1],
        events=dict(Counter(str(e.get(EVENT)) for e in run.events)),
        n_params=s.n_params,
        n_params_non_embedding=s.n_params_non_embedding,
        tokens=s.tokens,
        wall_time_s=s.wall_time_s,
        sweep_id=s.sweep_id,
        experiment=_first(s.experiment, run.config_value("experiment")),
        code_commit=code_commit(s.code),
        error=run.error if run.error is not None else s.error,
    )
    return row, variant


def code_commit(code: Optional[dict[str, Any]]) -> Optional[str]:
    """A summary's ``code`` as one cell: 12 digits of the commit, "+dirty" where proxy/ or conf/
    had uncommitted changes; None for a run that recorded none (older runs, a copied tree)."""
    commit = (code or {}).get("commit")
    if not isinstance(commit, str) or not commit:
        return None
    return commit[:12] + ("+dirty" if (code or {}).get("dirty") else "")


def _loss_spike_counts(run: Run) -> tuple[Optional[int], Optional[int]]:
    """(spikes, collapses) of the run's probe/loss series; (None, None) where it logged none."""
    steps, values = run.series(PROBE_LOSS)
    if not steps:
        return None, None
    found = loss_spikes(steps, values)
    spikes = sum(s.kind == "spike" for s in found)
    return spikes, len(found) - spikes


def _vocab_size(run: Run) -> Optional[int]:
    return _first(_integer(run.config_value("model.vocab_size")), _synthetic_vocab_size(run))


def _synthetic_vocab_size(run: Run) -> Optional[int]:
    """The built-in language's vocabulary as the run's config names it (its rare tokens and its
    mixed-in sub-language's tokens included); None for other sources."""
    if run.config_value("data.source") not in (None, "synthetic"):
        return None
    vocab = _integer(run.config_value("data.synthetic.vocab_size"))
    if vocab is None:
        return None
    for share, count in (("rare_rate", "rare_tokens"), ("sublanguage_fraction", "sublanguage_tokens")):
        on = run.config_value(f"data.synthetic.{share}")
        extra = _integer(run.config_value(f"data.synthetic.{count}"))
        if isinstance(on, (int, float)) and on > 0 and extra is not None:
            vocab += extra
    return vocab


# --------------------------------------------------------------------------------------------
# LR sensitivity per variant
# --------------------------------------------------------------------------------------------
def sensitivity_row(
    variant: tuple[str, ...],
    label: str,
    members: list[tuple[RunRow, Run]],
    lr_range: Optional[tuple[float, float]] = None,
) -> SensitivityRow:
    on_curve = [(row, run) for row, run in members if row.status in FINISHED and row.lr is not None]
    notes = []
    n_excluded = len(members) - len(on_curve)
    if n_excluded:
        notes.append(f"{n_excluded} run(s) not finished or without an LR left off the curve")
    known_inits = [row.loss_at_init for row, _ in on_curve if finite(row.loss_at_init)]
    fallback = statistics.median(known_inits) if known_inits else None
    lrs: list[float] = []
    losses: list[Optional[float]] = []
    inits: list[float] = []
    blown: list[bool] = []
    for row, run in on_curve:
        init = row.loss_at_init if finite(row.loss_at_init) else fallback
        if init is None:
            init = analysis.uniform_loss(_vocab_size(run))
            if init is not None:
                notes.append(f"{row.name}: loss at init unknown, ln(vocab) used")
        if init is None:
            notes.append(f"{row.name}: loss at init unknown, left off the curve")
            continue
        assert row.lr is not None  # on_curve keeps only the rows with an LR
        lrs.append(row.lr)
        losses.append(row.final_loss)
        inits.append(init)
        blown.append(row.status in BLOWN_UP)
    sizes = Counter(row.n_params for row, _ in members if row.n_params)
    if len(sizes) > 1:
        notes.append(f"runs of different sizes share these overrides: {', '.join(map(str, sorted(sizes)))} params")
    n_params = sizes.most_common(1)
    out = SensitivityRow(
        variant=label,
        overrides=",".join(variant),
        n_params=n_params[0][0] if n_params else None,
        lrs=[],
        losses=[],
        blown_up_lrs=sorted({lr for lr, b in zip(lrs, blown) if b}),
        loss_at_init=statistics.median(inits) if inits else None,
        best_lr=None,
        best_loss=None,
        sensitivity=None,
        n_runs=len(members),
        n_diverged=sum(row.status == STATUS_DIVERGED for row, _ in members),
        n_failed=sum(row.status == FAILED for row, _ in members),
        n_excluded=n_excluded,
    )
    if lrs:
        curve = analysis.per_lr_losses(lrs, losses, inits, blown)
        out.lrs, out.losses = list(curve), list(curve.values())
        low, high = lr_range or (0.0, math.inf)
        inside = {lr: loss for lr, loss in curve.items() if low <= lr <= high}
        if not inside:
            notes.append(f"no swept LR inside the range [{low:g}, {high:g}]")
        else:
            value = analysis.lr_sensitivity(lrs, losses, inits, blown, lr_range=lr_range)
            if math.isnan(value):
                notes.append("no LR trained below its loss at init")
            else:
                out.sensitivity = value
                out.best_lr = min(inside, key=inside.__getitem__)
                out.best_loss = inside[out.best_lr]
                if len(inside) >= 3 and not analysis.best_is_inside(inside):
                    edge = "lowest" if out.best_lr == min(inside) else "highest"
                    notes.append(
                        f"best LR {out.best_lr:g} is the grid's {edge}: the optimum may lie outside it, and the "
                        "sensitivity depends on the grid (extend it past the optimum)"
                    )
            if len(inside) == 1:
                notes.append(SINGLE_LR_NOTE)
    out.note = "; ".join(notes)
    return out


# --------------------------------------------------------------------------------------------
# All runs at once: rows labelled and grouped by variant
# --------------------------------------------------------------------------------------------
@dataclass
class Tables:
    runs: list[RunRow]  # grouped by variant (first appearance), then LR, seed, name
    sensitivity: list[SensitivityRow]  # one per variant, in the same order
    groups: list[tuple[str, list[tuple[RunRow, Run]]]]  # (variant label, its rows and runs)
    shared_overrides: tuple[str, ...]  # overrides every variant has, left out of the variant labels
    constant: tuple[str, ...] = ()  # what every run has, left out of the run labels (run_labels)


def run_labels(
    rows: Sequence[RunRow],
    variants: Sequence[tuple[str, ...]],
    labels: dict[tuple[str, ...], str],
    shared: tuple[str, ...],
) -> tuple[list[str], tuple[str, ...]]:
    """Name each run by what varies across the runs only, in its name's spelling and order
    (proxy.analysis.run_name_from: sorted overrides, ","-joined): its variant label (when there is
    more than one variant), ``optim.lr=`` and ``train.seed=`` (when they vary). Returns the names,
    in the order of ``rows``, and what every run has in common (stated once above the runs
    table). Runs that nothing tells apart are named by their directory as well."""
    several_variants = len(set(variants)) > 1
    lrs, seeds = [row.lr for row in rows], [row.seed for row in rows]
    constant = list(shared if several_variants else (variants[0] if variants else ()))
    if len(set(lrs)) == 1 and lrs[0] is not None:
        constant.append(f"{LR_KEY}={lrs[0]:g}")
    if len(set(seeds)) == 1 and seeds[0] is not None:
        constant.append(f"{SEED_KEY}={seeds[0]}")
    names = []
    for row, variant in zip(rows, variants):
        rest = [item for item in variant if item not in shared]
        parts = (rest or [labels[variant]]) if several_variants else []  # labels[variant]: "baseline"
        if len(set(lrs)) > 1:
            parts.append(f"{LR_KEY}={row.lr:g}" if row.lr is not None else f"{LR_KEY}=?")
        if len(set(seeds)) > 1:
            parts.append(f"{SEED_KEY}={row.seed}" if row.seed is not None else f"{SEED_KEY}=?")
        names.append(",".join(sorted(parts)))
    counts = Counter(names)

    def unique(name: str, row: RunRow) -> str:
        if name and counts[name] == 1:
            return name
        folder = Path(row.path).name
        return f"{name} [{folder}]" if name else folder

    return [unique(name, row) for name, row in zip(names, rows)], tuple(sorted(constant))


def tabulate(runs: Sequence[Run], spikes: SpikeOptions, lr_range: Optional[tuple[float, float]] = None) -> Tables:
    """Reduce loaded runs to the report's tables."""
    pairs = [(*run_row(run, spikes), run) for run in map(usable, runs)]
    labels, shared = analysis.variant_labels([variant for _, variant, _ in pairs])
    for row, variant, _ in pairs:
        row.variant = labels[variant]
    order = list(dict.fromkeys(variant for _, variant, _ in pairs))  # first appearance
    pairs.sort(key=lambda p: (order.index(p[1]), p[0].lr or 0.0, p[0].seed or 0, p[0].name))
    groups = [(labels[v], [(row, run) for row, variant, run in pairs if variant == v]) for v in order]
    sensitivity = [sensitivity_row(v, labels[v], members, lr_range) for v, (_, members) in zip(order, groups)]
    names, constant = run_labels([row for row, _, _ in pairs], [v for _, v, _ in pairs], labels, shared)
    for (row, _, _), name in zip(pairs, names):
        row.label = name
    return Tables([row for row, _, _ in pairs], sensitivity, groups, shared, constant)


def write_csv(path: Path, rows: list[RunRow]) -> None:
    """runs.csv, written whole; a text cell a spreadsheet would run as a formula is neutralised."""
    names = [f.name for f in fields(RunRow)]
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(names)
    for row in rows:
        record = asdict(row)
        record["events"] = ";".join(f"{k}:{v}" for k, v in row.events.items())
        writer.writerow(["" if record[n] is None else csv_cell(record[n]) for n in names])
    atomic_write_text(path, buffer.getvalue())
