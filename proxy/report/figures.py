"""The report's figures: curves over steps per variant (one line per LR), the max attention logit
per layer, and final loss against the LR. Each function returns a matplotlib ``Figure`` (drawn
with Agg, no display needed) or None when no run logged what it plots.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display
from matplotlib.lines import Line2D

from proxy import analysis
from proxy.analysis import SpikeOptions
from proxy.records import (ATTN_MAX_LOGIT_LAYER, EVENT, GRAD_NORM, OUTPUT_LOGIT_MEAN, OUTPUT_LSE_MEAN, STEP,
                           TRAIN_LOSS, VAL_LOSS, Branch, Run)
from proxy.report.document import fmt
from proxy.report.tables import BLOWN_UP, RunRow, SensitivityRow, Tables, finite, layer_index, layer_keys

MAX_LAYER_PANELS = 6
Groups = list[tuple[str, list[tuple[RunRow, Run]]]]


# --------------------------------------------------------------------------------------------
# Building blocks
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
        step = event.get(STEP)
        if not isinstance(step, (int, float)):
            continue
        value = event.get("value")
        if TRIGGER_KEYS.get(str(event.get("trigger"))) == key and finite(value):
            y = float(value)
        else:
            branch = _event_branch(run, event)
            b_steps, b_values = branch.series(key) if branch is not None else (steps, values)
            if not b_steps:
                continue
            i = max(0, int(np.searchsorted(b_steps, step, side="right")) - 1)
            y = b_values[i]
        if finite(y):
            kind = str(event.get(EVENT))
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
    groups: Groups,
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
            plot_values = [v if (finite(v) and (v > 0 or not log_y)) else np.nan for v in values]
            ax.plot(steps, plot_values, color=color, linewidth=1.2)
            for branch in run.abandoned:  # steps a rollback threw away, then re-ran
                b_steps, b_values = branch.series(key)
                marked["abandoned"] |= bool(b_steps)
                ax.plot(b_steps, [v if (finite(v) and (v > 0 or not log_y)) else np.nan for v in b_values],
                        color=color, linewidth=0.9, linestyle=":", alpha=0.8)
            if overlay:
                o_steps, o_values = run.series(overlay)
                ax.plot(o_steps, o_values, color=color, linestyle="--", linewidth=1, marker=".", markersize=4)
            if spikes and values:
                hit = analysis.detect_spikes(values, spikes).indices
                finite_hits = [i for i in hit if finite(plot_values[i])]
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
    groups: Groups, palette: _Palette
) -> Optional[Figure]:
    """Rows: variants; columns: layers (block 0 first: where Wortsman et al. see growth)."""
    layers = sorted(
        {k for _, members in groups for _, run in members for k in layer_keys(run)}, key=layer_index
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
                    [v if finite(v) and v > 0 else np.nan for v in values],
                    color=palette.color(row.lr),
                    linewidth=1.2,
                )
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.set_title(f"{label} | layer {key[len(ATTN_MAX_LOGIT_LAYER):]}", fontsize=9)
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
            label=f"{row.variant} (sens. {fmt(row.sensitivity)})",
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
# Every figure of a report
# --------------------------------------------------------------------------------------------
CAPTIONS = {
    "lr_vs_loss": "Final loss vs peak LR, one line per variant; "
    "X: diverged or failed (plotted at the loss at init).",
    "loss": "Train loss (solid) and val loss (dashed) per variant, one line per LR. Red circles: "
    "loss spikes; X: end of a diverged/failed run; other markers: trainer events.",
    "attn_max_logit": "Max attention logit per layer (log scale), one line per LR.",
    "output_logit_mean": "Mean output logit per variant, one line per LR "
    "(with log Z = 0 it is the mean log-probability, at most -ln V).",
    "output_log_z": "log Z (mean log-sum-exp of the output logits, the gap between logits and "
    "log-probabilities) per variant, one line per LR; z-loss pulls it toward 0.",
    "grad_norm": "Global grad norm (log scale) per variant, one line per LR. "
    "Red circles: detected spikes; other markers: trainer events.",
}


def draw_figures(tables: Tables, spikes: SpikeOptions, folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Draw every figure the runs have data for into ``folder`` (PNG); returns {name: path} in
    :data:`CAPTIONS` order and notes on the figures that could not be drawn."""
    groups, rows, sensitivity = tables.groups, tables.runs, tables.sensitivity
    palette = _Palette(row.lr for row in rows)
    kinds = {
        k: EVENT_MARKERS[i % len(EVENT_MARKERS)]
        for i, k in enumerate(sorted({str(e.get(EVENT)) for _, members in groups for _, r in members
                                      for e in r.events}))
    }
    variant_colors = {label: f"C{i % 10}" for i, (label, _) in enumerate(groups)}
    inits = [row.loss_at_init for row in rows if finite(row.loss_at_init)]
    loss_top = 1.15 * max(inits) if inits else None  # a diverged run must not flatten everyone else
    swept = any(len(row.lrs) > 1 for row in sensitivity)  # an LR curve to draw
    candidates = {
        "lr_vs_loss": _lr_figure(sensitivity, variant_colors) if swept else None,
        "loss": _series_panels(
            TRAIN_LOSS, groups, palette, spikes, kinds, "loss", overlay=VAL_LOSS, ylim_top=loss_top
        ),
        "attn_max_logit": _attention_figure(groups, palette),
        "output_logit_mean": _series_panels(OUTPUT_LOGIT_MEAN, groups, palette, None, kinds, "output logit mean"),
        "output_log_z": _series_panels(OUTPUT_LSE_MEAN, groups, palette, None, kinds, "log Z"),
        "grad_norm": _series_panels(GRAD_NORM, groups, palette, spikes, kinds, "grad norm", log_y=True),
    }
    figures: dict[str, Path] = {}
    notes: list[str] = []
    folder.mkdir(parents=True, exist_ok=True)
    for name, fig in candidates.items():
        if fig is None:
            if name != "lr_vs_loss" or swept:
                notes.append(f"no figure '{name}': no run logged the metrics it needs")
            continue
        figures[name] = folder / f"{name}.png"
        fig.savefig(figures[name], dpi=100)
    return figures, notes
