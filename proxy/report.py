"""Run directories in, an instability report out.

    proxy-report runs/multirun/2026-01-01/12-00-00 [more paths...] [--out DIR]

writes ``report.html`` (self-contained: figures embedded as base64 PNG), ``report.md`` (linking
``figures/*.png``) and ``runs.csv`` into DIR (default: ``<first path>/report``). The report reads
only run directories (:mod:`proxy.records`), never wandb or a live process, so a sweep made on a
cluster can be copied home and reported on a laptop.

What it shows, per run and per *variant* (a run's command-line overrides minus the LR and the
seed: the runs of one LR-sensitivity curve):

- the runs table: status, losses, steps, attention/output logit statistics, spike scores;
- LR sensitivity (Wortsman et al.) per variant beside the LR-vs-final-loss curves;
- curves over steps: loss, max attention logit per layer, output logit mean, grad norm, with
  detected spikes and the trainer's events (skip-step, rollback, ...) marked.

Every run found is listed: failed, diverged and still-running runs are reported, never dropped.
:func:`build_report` returns the tables as data (:class:`ReportResult`) for scripts.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display
from matplotlib.lines import Line2D

from proxy import analysis
from proxy.analysis import SpikeOptions
from proxy.records import Branch, Run, find_runs, load_run

TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
GRAD_NORM = "optim/grad_norm"
ATTN_MAX = "attn/max_logit"
ATTN_LAYER = "attn/max_logit/layer_"
OUTPUT_MEAN = "output/logit_mean"

FINISHED = ("completed", "diverged", "failed")  # runs that are points of an LR curve
BLOWN_UP = ("diverged", "failed")  # count as the loss at init (Wortsman et al.)
MAX_LAYER_PANELS = 6
MAX_EVENT_ROWS = 200
SINGLE_LR_NOTE = "a single LR: sensitivity is 0 by construction"  # left out when no variant has more


class ReportError(ValueError):
    """Input the report cannot be built from (no such path, no run directories)."""


# --------------------------------------------------------------------------------------------
# Tables as data
# --------------------------------------------------------------------------------------------
@dataclass
class RunRow:
    """One run directory, reduced to the numbers the report tabulates."""

    name: str
    path: str
    variant: str  # short label (what tells this variant apart from the others)
    overrides: str  # the variant's full overrides, ", "-joined
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
    n_params: Optional[int] = None
    n_params_non_embedding: Optional[int] = None
    tokens: Optional[int] = None
    wall_time_s: Optional[float] = None
    sweep_id: Optional[str] = None
    experiment: Optional[str] = None
    error: Optional[str] = None

    @property
    def final_loss(self) -> Optional[float]:
        """The loss an LR curve uses: final val loss, else final train loss."""
        for value in (self.final_val_loss, self.final_train_loss):
            if _finite(value):
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
# Reading runs
# --------------------------------------------------------------------------------------------
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> Optional[float]:
    """A summary/config value as a float; strings like '1e-3' too, interpolations not."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _integer(value: Any) -> Optional[int]:
    number = _number(value)
    return int(number) if number is not None and math.isfinite(number) else None


def _config_get(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _layer_index(key: str) -> int:
    suffix = key[len(ATTN_LAYER) :]
    return int(suffix) if suffix.isdigit() else -1


def _layer_keys(run: Run) -> list[str]:
    return sorted((k for k in run.keys() if k.startswith(ATTN_LAYER)), key=_layer_index)


def _loss_at_init(run: Run) -> Optional[float]:
    """Summary value, else the val (or train) loss logged at step 0."""
    value = _number(run.summary.get("loss_at_init"))
    if value is not None:
        return value
    for key in (VAL_LOSS, TRAIN_LOSS):
        steps, values = run.series(key)
        if steps and steps[0] == 0 and _finite(values[0]):
            return values[0]
    return None


def _run_row(run: Run, spikes: SpikeOptions) -> tuple[RunRow, tuple[str, ...]]:
    s, config = run.summary, run.config
    overrides = [str(o) for o in (s.get("overrides") or [])]
    variant = analysis.variant_of(overrides)
    lr = _first(
        _number(s.get("lr")),
        _number(_config_get(config, "optim.lr")),
        _number(analysis.override_value(overrides, "optim.lr")),
    )
    _, attn = run.series(ATTN_MAX)
    if not attn:  # older runs: only per-layer keys
        per_layer = [run.series(k)[1] for k in _layer_keys(run)]
        attn = [max(vals) for vals in zip(*per_layer)] if per_layer else []
    _, train = run.series(TRAIN_LOSS)
    _, val = run.series(VAL_LOSS)
    _, grad_norm = run.series(GRAD_NORM)
    _, out_mean = run.series(OUTPUT_MEAN)
    last_step = max((row["step"] for row in run.metrics), default=None)
    row = RunRow(
        name=run.name,
        path=str(run.path),
        variant="",  # labelled once every variant is known
        overrides=", ".join(variant),
        lr=lr,
        seed=_integer(_config_get(config, "train.seed")),
        status=str(run.status),
        steps_completed=_first(_integer(s.get("steps_completed")), last_step),
        steps_planned=_first(_integer(s.get("steps_planned")), _integer(_config_get(config, "train.steps"))),
        loss_at_init=_loss_at_init(run),
        final_train_loss=_first(_number(s.get("final_train_loss")), train[-1] if train else None),
        final_val_loss=_first(_number(s.get("final_val_loss")), val[-1] if val else None),
        best_val_loss=_first(
            _number(s.get("best_val_loss")), min((v for v in val if _finite(v)), default=None)
        ),
        max_attn_logit_peak=_first(_number(s.get("max_attn_logit_peak")), analysis.peak(attn)),
        max_attn_logit_final=_first(_number(s.get("max_attn_logit_final")), analysis.last_finite(attn)),
        output_logit_mean_final=_first(
            _number(s.get("output_logit_mean_final")), analysis.last_finite(out_mean)
        ),
        spike_score_loss=analysis.spike_score(train, spikes) if train else None,
        spike_score_grad_norm=analysis.spike_score(grad_norm, spikes) if grad_norm else None,
        diverged_at_step=_integer(s.get("diverged_at_step")),
        events=dict(Counter(str(e.get("event")) for e in run.events)),
        n_params=_integer(s.get("n_params")),
        n_params_non_embedding=_integer(s.get("n_params_non_embedding")),
        tokens=_integer(s.get("tokens")),
        wall_time_s=_number(s.get("wall_time_s")),
        sweep_id=s.get("sweep_id"),
        experiment=_first(s.get("experiment"), config.get("experiment")),
        error=s.get("error"),
    )
    return row, variant


def _vocab_size(run: Run) -> Optional[int]:
    config = run.config
    return _first(
        _integer(_config_get(config, "model.vocab_size")),
        (
            _integer(_config_get(config, "data.synthetic.vocab_size"))
            if _config_get(config, "data.source") in (None, "synthetic")
            else None
        ),
    )


# --------------------------------------------------------------------------------------------
# LR sensitivity per variant
# --------------------------------------------------------------------------------------------
def _sensitivity(
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
    known_inits = [row.loss_at_init for row, _ in on_curve if _finite(row.loss_at_init)]
    fallback = statistics.median(known_inits) if known_inits else None
    lrs, losses, inits, blown = [], [], [], []
    for row, run in on_curve:
        init = row.loss_at_init if _finite(row.loss_at_init) else fallback
        if init is None:
            init = analysis.uniform_loss(_vocab_size(run))
            if init is not None:
                notes.append(f"{row.name}: loss at init unknown, ln(vocab) used")
        if init is None:
            notes.append(f"{row.name}: loss at init unknown, left off the curve")
            continue
        lrs.append(row.lr)
        losses.append(row.final_loss)
        inits.append(init)
        blown.append(row.status in BLOWN_UP)
    sizes = Counter(row.n_params for row, _ in members if row.n_params)
    if len(sizes) > 1:
        notes.append(
            f"runs of different sizes share these overrides: {', '.join(map(str, sorted(sizes)))} params"
        )
    n_params = sizes.most_common(1)
    out = SensitivityRow(
        variant=label,
        overrides=", ".join(variant),
        n_params=n_params[0][0] if n_params else None,
        lrs=[],
        losses=[],
        blown_up_lrs=sorted({lr for lr, b in zip(lrs, blown) if b}),
        loss_at_init=statistics.median(inits) if inits else None,
        best_lr=None,
        best_loss=None,
        sensitivity=None,
        n_runs=len(members),
        n_diverged=sum(row.status == "diverged" for row, _ in members),
        n_failed=sum(row.status == "failed" for row, _ in members),
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
            if len(inside) == 1:
                notes.append(SINGLE_LR_NOTE)
    out.note = "; ".join(notes)
    return out


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
class _Palette:
    """One colour per LR, the same in every figure (log scale, so 1e-3..1e-1 spread evenly)."""

    def __init__(self, lrs: Iterable[Optional[float]]):
        values = sorted({lr for lr in lrs if lr})
        self.lrs = values
        low, high = (values[0], values[-1]) if values else (1.0, 1.0)
        self.norm = LogNorm(vmin=low / 1.0001, vmax=high * 1.0001)
        self.cmap = colormaps["plasma"]

    def color(self, lr: Optional[float]) -> Any:
        if not lr or len(self.lrs) < 2:
            return "tab:blue"
        return self.cmap(0.05 + 0.8 * float(self.norm(lr)))

    def handles(self) -> list[Line2D]:
        return [Line2D([], [], color=self.color(lr), label=f"lr {lr:g}") for lr in self.lrs]


EVENT_MARKERS = ("v", "^", "s", "D", "P", "*", "h", "<", ">")


def _grid(
    n_panels: int, n_cols: int, width: float = 4.2, height: float = 3.0, **kw: Any
) -> tuple[Figure, np.ndarray]:
    n_cols = max(1, min(n_cols, n_panels))
    n_rows = math.ceil(n_panels / n_cols)
    fig = Figure(figsize=(width * n_cols + 1.6, height * n_rows + 0.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False, **kw))
    for ax in axes.flat[n_panels:]:
        ax.set_visible(False)
    return fig, axes


TRIGGER_KEYS = {"loss": TRAIN_LOSS, "grad_norm": GRAD_NORM}  # an event's trigger -> its series


def _event_branch(run: Run, event: dict[str, Any]) -> Optional[Branch]:
    """The abandoned branch an event happened on (a rollback ends its own branch), or None."""
    return next((b for b in run.abandoned if b.rollback is event or any(e is event for e in b.events)), None)


def _mark_events(
    ax: Any, run: Run, key: str, steps: Sequence[int], values: Sequence[float], kinds: dict[str, str],
    color: Any,
) -> None:
    """Put each event (remedy action) on the run's curve of ``key``: at its trigger value when it
    fired on this series, else at the nearest logged step before it, on the branch it happened on
    (a rollback and what preceded it sit on the abandoned branch, not on the replayed steps)."""
    for event in run.events:
        step = event.get("step")
        if not isinstance(step, (int, float)):
            continue
        value = event.get("value")
        if TRIGGER_KEYS.get(str(event.get("trigger"))) == key and _finite(value):
            y = float(value)
        else:
            branch = _event_branch(run, event)
            b_steps, b_values = branch.series(key) if branch is not None else (steps, values)
            if not b_steps:
                continue
            i = max(0, int(np.searchsorted(b_steps, step, side="right")) - 1)
            y = b_values[i]
        if _finite(y):
            kind = str(event.get("event"))
            ax.plot(
                [step],
                [y],
                linestyle="none",
                marker=kinds[kind],
                color=color,
                markeredgecolor="black",
                markersize=7,
                zorder=5,
            )


def _series_panels(
    key: str,
    groups: list[tuple[str, list[tuple[RunRow, Run]]]],
    palette: _Palette,
    spikes: Optional[SpikeOptions],
    kinds: dict[str, str],
    ylabel: str,
    log_y: bool = False,
    overlay: Optional[str] = None,
    ylim_top: Optional[float] = None,
) -> Optional[Figure]:
    """A panel per variant, one line per run coloured by LR; spikes, events, divergence marked."""
    if not any(run.series(key)[0] for _, members in groups for _, run in members):
        return None
    fig, axes = _grid(len(groups), 3, sharey=True)
    marked = {"spike": False, "blown": False, "abandoned": False}  # legend entries for what is drawn
    for ax, (label, members) in zip(axes.flat, groups):
        for row, run in sorted(members, key=lambda m: m[0].lr or 0):
            steps, values = run.series(key)
            color = palette.color(row.lr)
            plot_values = [v if (_finite(v) and (v > 0 or not log_y)) else np.nan for v in values]
            ax.plot(steps, plot_values, color=color, linewidth=1.2)
            for branch in run.abandoned:  # steps a rollback threw away, then re-ran
                b_steps, b_values = branch.series(key)
                marked["abandoned"] |= bool(b_steps)
                ax.plot(b_steps, [v if (_finite(v) and (v > 0 or not log_y)) else np.nan for v in b_values],
                        color=color, linewidth=0.9, linestyle=":", alpha=0.8)
            if overlay:
                o_steps, o_values = run.series(overlay)
                ax.plot(o_steps, o_values, color=color, linestyle="--", linewidth=1, marker=".", markersize=4)
            if spikes and values:
                hit = analysis.detect_spikes(values, spikes).indices
                finite_hits = [i for i in hit if _finite(plot_values[i])]
                marked["spike"] |= bool(finite_hits)
                ax.plot(
                    [steps[i] for i in finite_hits],
                    [plot_values[i] for i in finite_hits],
                    linestyle="none",
                    marker="o",
                    markerfacecolor="none",
                    markeredgecolor="red",
                    markersize=9,
                    zorder=6,
                )
            _mark_events(ax, run, key, steps, plot_values, kinds, color)
            if row.status in BLOWN_UP and steps:
                last = analysis.last_finite(plot_values)
                if last is not None:
                    marked["blown"] = True
                    ax.plot(
                        [steps[-1]],
                        [last],
                        marker="X",
                        color=color,
                        markeredgecolor="black",
                        markersize=9,
                        zorder=6,
                    )
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if log_y:
            ax.set_yscale("log")
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    if ylim_top is not None:
        bottom, top = axes.flat[0].get_ylim()
        if top > ylim_top > bottom:
            axes.flat[0].set_ylim(bottom, ylim_top)
    _legend(fig, palette, kinds, marked["spike"], marked["blown"], overlay, marked["abandoned"])
    return fig


def _legend(
    fig: Figure,
    palette: _Palette,
    kinds: dict[str, str],
    spikes: bool,
    blown: bool,
    overlay: Optional[str] = None,
    abandoned: bool = False,
) -> None:
    handles = palette.handles()
    if overlay:
        handles.append(Line2D([], [], color="gray", linestyle="--", marker=".", label=overlay))
    if abandoned:
        handles.append(Line2D([], [], color="gray", linestyle=":", label="rolled back"))
    if spikes:
        handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker="o",
                markerfacecolor="none",
                markeredgecolor="red",
                label="spike",
            )
        )
    if blown:
        handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker="X",
                color="gray",
                markeredgecolor="black",
                label="diverged / failed",
            )
        )
    for kind, marker in kinds.items():
        handles.append(
            Line2D(
                [],
                [],
                linestyle="none",
                marker=marker,
                color="gray",
                markeredgecolor="black",
                label=f"event: {kind}",
            )
        )
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)


def _attention_figure(
    groups: list[tuple[str, list[tuple[RunRow, Run]]]], palette: _Palette
) -> Optional[Figure]:
    """Rows: variants; columns: layers (block 0 first: where Wortsman et al. see growth)."""
    layers = sorted(
        {k for _, members in groups for _, run in members for k in _layer_keys(run)}, key=_layer_index
    )
    if not layers:
        return None
    if len(layers) > MAX_LAYER_PANELS:
        picks = np.linspace(0, len(layers) - 1, MAX_LAYER_PANELS).round().astype(int)
        layers = [layers[i] for i in sorted(set(picks))]
    fig = Figure(figsize=(3.4 * len(layers) + 1.6, 2.8 * len(groups) + 0.4), layout="constrained")
    axes = fig.subplots(len(groups), len(layers), squeeze=False, sharey=True)
    for r, (label, members) in enumerate(groups):
        for c, key in enumerate(layers):
            ax = axes[r, c]
            for row, run in sorted(members, key=lambda m: m[0].lr or 0):
                steps, values = run.series(key)
                ax.plot(
                    steps,
                    [v if _finite(v) and v > 0 else np.nan for v in values],
                    color=palette.color(row.lr),
                    linewidth=1.2,
                )
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.set_title(f"{label} | layer {key[len(ATTN_LAYER):]}", fontsize=9)
            if r == len(groups) - 1:
                ax.set_xlabel("step")
        axes[r, 0].set_ylabel("max attention logit")
    fig.legend(handles=palette.handles(), loc="outside right upper", fontsize=8)
    return fig


def _lr_figure(sensitivity: list[SensitivityRow], variant_colors: dict[str, Any]) -> Optional[Figure]:
    rows = [row for row in sensitivity if row.lrs]
    if not rows:
        return None
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for row in rows:
        color = variant_colors[row.variant]
        ax.plot(
            row.lrs,
            row.losses,
            marker="o",
            color=color,
            label=f"{row.variant} (sens. {_fmt(row.sensitivity)})",
        )
        blown = [(lr, loss) for lr, loss in zip(row.lrs, row.losses) if lr in row.blown_up_lrs]
        if blown:
            ax.plot(
                *zip(*blown),
                linestyle="none",
                marker="X",
                markersize=11,
                color=color,
                markeredgecolor="black",
            )
    inits = [row.loss_at_init for row in rows if row.loss_at_init is not None]
    if inits:
        ax.axhline(statistics.median(inits), color="gray", linestyle=":", label="loss at init")
    ax.plot(
        [],
        [],
        linestyle="none",
        marker="X",
        color="gray",
        markeredgecolor="black",
        label="diverged / failed (counts as loss at init)",
    )
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final loss, min(loss, loss at init)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------------------------
# Documents: one list of blocks, rendered to Markdown and to HTML
# --------------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}×{v}" for k, v in value.items()) or "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) or "—"
    return str(value)


# ("h", level, text) | ("p", text) | ("ul", items) | ("table", headers, rows) | ("fig", name, caption)
Block = tuple


def _to_markdown(title: str, blocks: list[Block]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    out = [f"# {title}", ""]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out += ["#" * (block[1] + 1) + " " + block[2], ""]
        elif kind == "p":
            out += [block[1], ""]
        elif kind == "ul":
            out += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            out.append("| " + " | ".join(cell(h) for h in headers) + " |")
            out.append("|" + "---|" * len(headers))
            out += ["| " + " | ".join(cell(_fmt(v)) for v in row) + " |" for row in rows]
            out.append("")
        elif kind == "fig":
            out += [f"![{block[2]}](figures/{block[1]}.png)", "", f"*{block[2]}*", ""]
    return "\n".join(out)


CSS = """
body{font-family:system-ui,-apple-system,sans-serif;margin:2em auto;max-width:1300px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
tr.completed td.status{color:#1a7f37}tr.diverged td.status{color:#cf222e;font-weight:bold}
tr.failed td.status{color:#8250df;font-weight:bold}tr.running td.status{color:#9a6700}
img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555;margin-bottom:1.5em}
code{background:#f6f8fa;padding:0 3px}
"""


def _to_html(title: str, blocks: list[Block], figures: dict[str, Path]) -> str:
    esc = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for block in blocks:
        kind = block[0]
        if kind == "h":
            out.append(f"<h{block[1] + 1}>{esc(block[2])}</h{block[1] + 1}>")
        elif kind == "p":
            out.append(f"<p>{esc(block[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            headers, rows = block[1], block[2]
            status_col = headers.index("status") if "status" in headers else None
            out.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>")
            for row in rows:
                css = f' class="{esc(str(row[status_col]))}"' if status_col is not None else ""
                tds = "".join(
                    (
                        f'<td class="status">{esc(_fmt(v))}</td>'
                        if i == status_col
                        else f"<td>{esc(_fmt(v))}</td>"
                    )
                    for i, v in enumerate(row)
                )
                out.append(f"<tr{css}>{tds}</tr>")
            out.append("</table>")
        elif kind == "fig":
            data = base64.b64encode(figures[block[1]].read_bytes()).decode("ascii")
            out.append(
                f'<figure><img alt="{esc(block[2])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(block[2])}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out)


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


def _run_table(rows: list[RunRow]) -> Block:
    body = []
    for row in rows:
        cells = []
        for _, attr in RUN_COLUMNS:
            if attr is None:
                cells.append(f"{_fmt(row.steps_completed)}/{_fmt(row.steps_planned)}")
            else:
                cells.append(getattr(row, attr))
        body.append(cells)
    return ("table", [h for h, _ in RUN_COLUMNS], body)


def _sensitivity_blocks(sensitivity: list[SensitivityRow], lr_range: Optional[tuple[float, float]]) -> list[Block]:
    blocks: list[Block] = []
    blocks.append(("h", 1, "LR sensitivity"))
    blocks.append(
        (
            "p",
            "Wortsman et al. (2023): mean over the swept LRs of min(final loss, loss at init) minus the "
            "best loss over the range, per variant; diverged and failed runs count as the loss at init. "
            "Final loss = final val loss (train loss when no eval). "
            "Lower is better; read it beside the curves."
            + (f" Averaged over LRs in [{lr_range[0]:g}, {lr_range[1]:g}] only." if lr_range else ""),
        )
    )
    blocks.append(
        (
            "table",
            [
                "variant",
                "params",
                "LR sensitivity",
                "best LR",
                "best loss",
                "loss@init",
                "runs",
                "diverged",
                "failed",
                "LR: loss",
                "note",
            ],
            [
                [
                    row.variant,
                    row.n_params,
                    row.sensitivity,
                    row.best_lr,
                    row.best_loss,
                    row.loss_at_init,
                    row.n_runs,
                    row.n_diverged,
                    row.n_failed,
                    "; ".join(f"{lr:g}: {loss:.4g}" for lr, loss in zip(row.lrs, row.losses)),
                    row.note,
                ]
                for row in sensitivity
            ],
        )
    )
    return blocks


def _single_lr_blocks(sensitivity: list[SensitivityRow]) -> list[Block]:
    return [
        ("h", 1, "Variants"),
        ("p", "Each variant was trained at a single LR, so there is no LR sensitivity to compute "
              "(it needs an LR sweep). Final loss = final val loss (train loss when no eval), "
              "averaged over the variant's runs (seeds)."),
        ("table", ["variant", "params", "LR", "final loss", "loss@init", "runs", "diverged", "failed", "note"],
         [[row.variant, row.n_params, row.lrs[0] if row.lrs else None, row.losses[0] if row.losses else None,
           row.loss_at_init, row.n_runs, row.n_diverged, row.n_failed,
           "; ".join(n for n in row.note.split("; ") if n != SINGLE_LR_NOTE)]
          for row in sensitivity]),
    ]


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
        (
            "p",
            f"{len(result_runs)} runs from {', '.join(str(p) for p in paths)}; "
            f"generated {time.strftime('%Y-%m-%d %H:%M:%S')}.",
        ),
        ("p", "Status: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + "."),
    ]
    if shared:
        blocks.append(("p", "Overrides shared by every run: " + ", ".join(shared) + "."))
    attention = [row for row in result_runs if row.status != "completed"]
    if attention:
        blocks.append(("h", 1, "Runs that did not complete"))
        items = []
        for row in attention:
            detail = {
                "diverged": f"diverged at step {_fmt(row.diverged_at_step)}",
                "failed": f"failed: {row.error or 'no error recorded'}",
                "running": "still running, or its process died (status never finalised)",
            }.get(row.status, f"status {row.status}")
            items.append(f"{row.name} [{row.variant}, lr {_fmt(row.lr)}]: {detail} — {row.path}")
        blocks.append(("ul", items))
    if all(len(row.lrs) <= 1 for row in sensitivity):
        blocks += _single_lr_blocks(sensitivity)  # no LR sweep: no LR sensitivity to show
    else:
        blocks += _sensitivity_blocks(sensitivity, lr_range)
    if "lr_vs_loss" in figures:
        blocks.append(
            (
                "fig",
                "lr_vs_loss",
                "Final loss vs peak LR, one line per variant; "
                "X: diverged or failed (plotted at the loss at init).",
            )
        )
    blocks.append(("h", 1, "Runs"))
    source = {analysis.OLMO2_SPIKES: " (OLMo 2)", analysis.OLMO_CORE_SPIKES: " (OLMo-core's detector)"}
    blocks.append(("p", f"Spike score{source.get(spikes, '')}: % of logged points {spikes.describe()}."))
    blocks.append(_run_table(result_runs))
    captions = {
        "loss": "Train loss (solid) and val loss (dashed) per variant, one line per LR. Red circles: "
        "loss spikes; X: end of a diverged/failed run; other markers: trainer events.",
        "attn_max_logit": "Max attention logit per layer (log scale), one line per LR.",
        "output_logit_mean": "Mean output logit per variant, one line per LR "
        "(drifts negative without weight decay / z-loss).",
        "grad_norm": "Global grad norm (log scale) per variant, one line per LR. "
        "Red circles: detected spikes; other markers: trainer events.",
    }
    present = [name for name in captions if name in figures]
    if present:
        blocks.append(("h", 1, "Curves over steps"))
        blocks += [("fig", name, captions[name]) for name in present]
    if events:
        blocks.append(("h", 1, "Events"))
        shown = events[:MAX_EVENT_ROWS]
        if len(events) > len(shown):
            blocks.append(
                ("p", f"First {len(shown)} of {len(events)} events (all are in each run's metrics.jsonl).")
            )
        blocks.append(
            (
                "table",
                [*EVENT_COLUMNS, "details"],
                [[name, *(e.get(k) for k in EVENT_COLUMNS[1:]), _event_details(e)] for name, e in shown],
            )
        )
    if notes:
        blocks.append(("h", 1, "Notes"))
        blocks.append(("ul", notes))
    return blocks


EVENT_COLUMNS = ("run", "step", "event", "trigger", "value", "threshold")


def _event_details(event: dict) -> str:
    """The fields of an event beyond the common ones (a divergence's reason, a rollback's target)."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in event.items() if k not in EVENT_COLUMNS)


def _write_csv(path: Path, rows: list[RunRow]) -> None:
    names = [f.name for f in fields(RunRow)]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for row in rows:
            record = asdict(row)
            record["events"] = ";".join(f"{k}:{v}" for k, v in row.events.items())
            writer.writerow(["" if record[n] is None else record[n] for n in names])


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
    (out / "figures").mkdir(parents=True, exist_ok=True)

    loaded = [load_run(d) for d in run_dirs]
    pairs = [(*_run_row(run, spikes), run) for run in loaded]
    labels, shared = analysis.variant_labels([variant for _, variant, _ in pairs])
    for row, variant, _ in pairs:
        row.variant = labels[variant]
    order = list(dict.fromkeys(variant for _, variant, _ in pairs))  # first appearance
    pairs.sort(key=lambda p: (order.index(p[1]), p[0].lr or 0.0, p[0].seed or 0, p[0].name))
    groups = [(labels[v], [(row, run) for row, variant, run in pairs if variant == v]) for v in order]
    sensitivity = [_sensitivity(v, labels[v], members, lr_range) for v, (_, members) in zip(order, groups)]
    rows = [row for row, _, _ in pairs]

    notes: list[str] = []
    palette = _Palette(row.lr for row in rows)
    kinds = {
        k: EVENT_MARKERS[i % len(EVENT_MARKERS)]
        for i, k in enumerate(sorted({str(e.get("event")) for r in loaded for e in r.events}))
    }
    variant_colors = {label: f"C{i % 10}" for i, (label, _) in enumerate(groups)}
    inits = [row.loss_at_init for row in rows if _finite(row.loss_at_init)]
    loss_top = 1.15 * max(inits) if inits else None  # a diverged run must not flatten everyone else
    swept = any(len(row.lrs) > 1 for row in sensitivity)  # an LR curve to draw
    candidates = {
        "lr_vs_loss": _lr_figure(sensitivity, variant_colors) if swept else None,
        "loss": _series_panels(
            TRAIN_LOSS, groups, palette, spikes, kinds, "loss", overlay=VAL_LOSS, ylim_top=loss_top
        ),
        "attn_max_logit": _attention_figure(groups, palette),
        "output_logit_mean": _series_panels(OUTPUT_MEAN, groups, palette, None, kinds, "output logit mean"),
        "grad_norm": _series_panels(GRAD_NORM, groups, palette, spikes, kinds, "grad norm", log_y=True),
    }
    figures: dict[str, Path] = {}
    for name, fig in candidates.items():
        if fig is None:
            if name != "lr_vs_loss" or swept:
                notes.append(f"no figure '{name}': no run logged the metrics it needs")
            continue
        figures[name] = out / "figures" / f"{name}.png"
        fig.savefig(figures[name], dpi=100)
    for row in rows:
        if row.final_loss is None and row.status == "completed":
            notes.append(f"{row.name}: completed but no final loss recorded")

    events = [(run.name, e) for run in (p[2] for p in pairs) for e in run.events]
    blocks = _blocks(rows, sensitivity, shared, spikes, paths, figures, events, notes, lr_range)
    result = ReportResult(
        out_dir=out,
        html=out / "report.html",
        markdown=out / "report.md",
        csv=out / "runs.csv",
        figures=figures,
        runs=rows,
        sensitivity=sensitivity,
        shared_overrides=shared,
        spikes=spikes,
        notes=notes,
    )
    result.markdown.write_text(_to_markdown(title, blocks) + "\n")
    result.html.write_text(_to_html(title, blocks, figures) + "\n")
    _write_csv(result.csv, rows)
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="proxy-report",
        description="Build an instability report (report.html, report.md, figures/, runs.csv) "
        "from run directories.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="run directories, multirun directories, or folders holding them",
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


if __name__ == "__main__":
    sys.exit(main())
